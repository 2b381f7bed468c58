"""The operator's API: what each control-socket op does.

Each handler takes the request's args and a progress sink, and returns a
JSON-able result or raises a RelocdError with a one-line message.
"""

from __future__ import annotations

import asyncio
import uuid as uuidlib
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from relocd import __version__
from relocd.config.domain import parse_vif_spec
from relocd.drivers.base import (
    INCOMING_SUFFIX,
    MAX_NAME,
    MIGRATED_AWAY_SUFFIX,
    Domain,
    DomainConfig,
    DomainState,
)
from relocd.cluster.handoff import withdraw_offer
from relocd.cluster.registry import forget_domain, register_domain
from relocd.config.settings import Settings
from relocd.engine.claims import Claim, ClaimTable
from relocd.engine.hooks import DomainHooks
from relocd.engine.host import Host
from relocd.engine.journal import PLAIN, TLS
from relocd.engine.policy import make_policy
from relocd.engine.result import MigrationResult
from relocd.engine.source import (
    TIMEOUT_ABORT,
    TIMEOUT_STOP,
    SendOptions,
    SourceMigration,
    new_migration_id,
    settling_task_name,
)
from relocd.engine.stream import ByteTransport, RecordChannel
from relocd.errors import ConfigError, DomainExists, DriverError, RelocdError
from relocd.protocol.records import Role
from relocd.protocol.state import Conversation
from relocd.server import clusterops, evacuate, jobs, saveops, settle
from relocd.server.recovery import dial_target
from relocd.server.requests import arg, progress_to
from relocd.server.tls import client_context, connect_tls
from relocd.server.transport import connect
from relocd.units import PAGE_SIZE, parse_rate


log = structlog.get_logger("relocd.ops")

Handler = Callable[[dict[str, Any], Any], Awaitable[Any]]


def format_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Operations:
    """The control socket's ops on a fully built host (no daemon, no optional fields)."""

    def __init__(self, host: Host, settings: Settings, listening: Callable[[], list[str]]) -> None:
        self.host = host
        self.settings = settings
        #: the relocation listeners' addresses, for `status`
        self.listening = listening
        #: uuid -> migration in flight (source side)
        self.outgoing: dict[str, SourceMigration] = {}
        #: migrations and saves in flight, for abort, job and migrate-set
        self.jobs = jobs.Jobs()
        #: evacuations in flight (abort --all stops them)
        self.evacuations: set[evacuate.Evacuation] = self.jobs.evacuations
        host.observers.append(jobs.record_history(host))

    @property
    def hooks(self) -> DomainHooks:
        return self.host.hooks

    def handlers(self) -> dict[str, Handler]:
        return {
            "status": self.status,
            "list": self.list,
            "create": self.create,
            "destroy": self.destroy,
            "migrate": self.migrate,
            "check": self.check,
            "stats": self.stats,
            "pause": self.pause,
            "resume": self.resume,
            "save": lambda args, sink: saveops.save(self.host, self.settings, args, sink, self.jobs),
            "abort": lambda args, sink: jobs.abort(self.jobs, args, sink),
            "job": lambda args, sink: jobs.watch(self.jobs, args, sink),
            "migrate_set": lambda args, sink: jobs.migrate_set(self.jobs, args, sink),
            "history": lambda args, sink: jobs.history(self.host, args, sink),
            "evacuate": lambda args, sink: evacuate.evacuate(
                self.host, self.migrate, self.evacuations, args, sink, self.settings.relocation_ssl
            ),
            "settle": lambda args, sink: settle.settle(
                self.host, lambda e: dial_target(self.settings, e), self._source_reachable, args, sink
            ),
            "restore": lambda args, sink: saveops.restore(self.host, self.settings, args, sink),
            "inspect": lambda args, sink: saveops.inspect(self.host, self.settings, args, sink),
            "cluster_hosts": lambda args, sink: clusterops.hosts(self.host, args, sink),
            "cluster_domains": lambda args, sink: clusterops.domains(self.host, args, sink),
        }

    # -- helpers ------------------------------------------------------------------

    async def _source_reachable(self, address: str) -> bool:
        """Does a relocd listen at ``address`` (either relocation port)?  For settle's guard."""
        s = self.settings
        for port in (s.relocation_port, s.relocation_ssl_port):
            try:
                async with asyncio.timeout(settle.PROBE_S):
                    _, writer = await asyncio.open_connection(address, port)
            except (OSError, TimeoutError):
                continue
            writer.close()
            return True
        return False

    def find(self, name: str) -> Domain:
        return self.host.find(name)

    @property
    def claims(self) -> ClaimTable:
        return self.host.claims

    def _state_of(self, dom: Domain) -> str:
        claim = self.claims.get(dom.config.uuid)
        if claim is not None and claim.moving:
            return DomainState.MIGRATING.value
        if dom.name.endswith(INCOMING_SUFFIX):
            return DomainState.INCOMING.value
        return dom.state.value

    async def drain(self, grace: float) -> None:
        """Shutdown: let outgoing migrations finish, then cancel (they roll back)."""
        if not self.host.tasks:
            return
        _, pending = await asyncio.wait(set(self.host.tasks), timeout=grace)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending, timeout=10)

    # -- ops -----------------------------------------------------------------------

    async def status(self, args: dict[str, Any], sink: Any) -> dict[str, Any]:
        s = self.settings
        return {
            "version": __version__,
            "relocation_server": s.relocation_server,
            "listen": self.listening(),
            "drivers": sorted(self.host.drivers),
            "domains": len(self.host.all_domains()),
            "outgoing": len(self.outgoing),
            "incoming": len(self.host.incoming),
            "reservations": len(self.host.reservations.all()),
            **self.host.in_doubt_counts(),
            "state_dir": str(s.state_dir),
        }

    async def list(self, args: dict[str, Any], sink: Any) -> list[dict[str, Any]]:
        out = []
        for dom in sorted(self.host.all_domains(), key=lambda x: x.name):
            out.append(
                {
                    "name": dom.name,
                    "state": self._state_of(dom),
                    "memory_mib": dom.config.memory_mib,
                    "vcpus": dom.config.vcpus,
                    "driver": dom.config.driver,
                    "uuid": dom.config.uuid,
                    "workload": dom.config.workload,
                }
            )
        return out

    async def create(self, args: dict[str, Any], sink: Any) -> dict[str, Any]:
        name = arg(args, "name", str)
        if len(name) > MAX_NAME:
            raise ConfigError(f"domain name longer than {MAX_NAME} characters")
        if name.endswith((INCOMING_SUFFIX, MIGRATED_AWAY_SUFFIX)):
            raise ConfigError(f"domain names may not end in {INCOMING_SUFFIX} or {MIGRATED_AWAY_SUFFIX}")
        driver_name = arg(args, "driver", str, self.settings.default_driver)
        driver = self.host.drivers.get(driver_name)
        if driver is None:
            raise DriverError(f"driver {driver_name!r} is not available on this host")
        vifs = tuple(parse_vif_spec(v) for v in arg(args, "vifs", list, []))
        try:
            config = DomainConfig(
                name=name,
                memory_mib=arg(args, "memory", int),
                vcpus=arg(args, "vcpus", int, 1),
                driver=driver_name,
                workload=arg(args, "workload", str, "idle"),
                vifs=vifs,
                **({"uuid": arg(args, "uuid", str)} if args.get("uuid") else {}),
            )
        except ValueError as exc:
            raise ConfigError(f"bad domain: {str(exc).splitlines()[0]}") from None
        for d in self.host.all_domains():
            if d.name in (name, name + INCOMING_SUFFIX, name + MIGRATED_AWAY_SUFFIX):
                raise DomainExists(f"a domain named {name!r} already exists")
        if self.host.find_uuid(config.uuid) is not None:
            raise DomainExists(f"a domain with uuid {config.uuid} already exists")
        await register_domain(self.host, config.uuid, name)  # with a cluster store: ours, or refused
        caps = await driver.capabilities()
        config = config.model_copy(update={"cpu_features": tuple(sorted(caps.cpu_features))})
        dom = await driver.create(config)
        try:
            await self.hooks.attach(dom, up=True)
        except RelocdError:
            await dom.destroy()
            raise
        log.info("domain created", domain=name, memory_mib=config.memory_mib, driver=driver_name)
        return {"name": dom.name, "uuid": dom.config.uuid, "state": dom.state.value, "driver": driver_name,
                "memory_mib": config.memory_mib, "vcpus": config.vcpus}  # fmt: skip

    def claim_domain(self, name: str, op: str, *, moving: bool = False) -> tuple[Domain, Claim]:
        return self.host.claim(name, op, moving=moving)

    async def destroy(self, args: dict[str, Any], sink: Any) -> dict[str, Any]:
        dom, claim = self.claim_domain(arg(args, "name", str), "destroy")
        with claim:
            await dom.destroy()
            await self.hooks.destroyed(dom)
            # after the copy is gone: a record deleted first would free the uuid while it still ran
            warning = await forget_domain(self.host, dom.config.uuid, dom.name)
        log.info("domain destroyed", domain=dom.name)
        return {"name": dom.name, **({"warning": warning} if warning else {})}

    async def pause(self, args: dict[str, Any], sink: Any) -> dict[str, Any]:
        dom, claim = self.claim_domain(arg(args, "name", str), "pause")
        with claim:
            await dom.pause()
            await self.hooks.paused(dom)
        return {"name": dom.name, "state": dom.state.value}

    async def resume(self, args: dict[str, Any], sink: Any) -> dict[str, Any]:
        dom, claim = self.claim_domain(arg(args, "name", str), "resume")
        with claim:
            await dom.resume()
            await self.hooks.resumed_here(dom)
        return {"name": dom.name, "state": dom.state.value}

    async def check(self, args: dict[str, Any], sink: Any) -> dict[str, Any]:
        """Verify the guest's page invariant (pauses the domain while it checks)."""
        dom, claim = self.claim_domain(arg(args, "name", str), "check")
        with claim:
            was_running = dom.state == DomainState.RUNNING
            if was_running:
                await dom.pause()
            try:
                problem = await dom.check_invariant()
            finally:
                if was_running:
                    await dom.resume()
        stats = await dom.stats()
        return {"name": dom.name, "ok": problem is None, "problem": problem, "stats": stats}

    async def stats(self, args: dict[str, Any], sink: Any) -> dict[str, Any]:
        dom = self.find(arg(args, "name", str))
        return {"name": dom.name, "state": dom.state.value, "stats": await dom.stats()}

    async def migrate(self, args: dict[str, Any], sink: Any) -> dict[str, Any]:
        s = self.settings
        name = arg(args, "name", str)
        host = arg(args, "host", str)
        # ssl: true (--ssl), false (--no-ssl) or absent (the config's xend-relocation-ssl)
        ssl_arg = arg(args, "ssl", bool, None)
        use_tls = s.relocation_ssl if ssl_arg is None else bool(ssl_arg)
        port = arg(args, "port", int, s.relocation_ssl_port if use_tls else s.relocation_port)
        live = bool(arg(args, "live", bool, False))
        verify = bool(arg(args, "verify", bool, False))
        tls_ctx = client_context(s) if use_tls else None  # a bad CA/key file fails here, in one line
        bw_text = arg(args, "max_bandwidth", str, None)
        try:
            max_bw = parse_rate(bw_text) if bw_text else s.max_bandwidth
        except ValueError as exc:
            raise ConfigError(f"--max-bandwidth: {exc}") from None
        policy = make_policy(
            arg(args, "policy", str, s.precopy_policy),
            downtime_ms=arg(args, "downtime_ms", int, s.downtime_ms),
            max_iterations=s.max_iterations,
            max_factor=s.max_factor,
            dirty_threshold=s.dirty_threshold,
        )
        mid = new_migration_id()
        target = format_host_port(host, port)
        # The claim is taken before the first await and held until the
        # migration has settled (in doubt included); the task releases it.
        dom, claim = self.claim_domain(name, f"migration to {target}", moving=True)
        options = SendOptions(
            live=live,
            verify=verify,
            policy=policy,
            max_bandwidth=max_bw,
            # under a bandwidth cap, batches of about a quarter second: the
            # cap stays smooth and no record outlasts the peer's idle timeout
            batch_pages=min(2048, max(16, max_bw // PAGE_SIZE // 4)) if max_bw else 2048,
            transport=TLS if tls_ctx is not None else PLAIN,
            server_name=host if tls_ctx is not None else None,
            timeout_s=_timeout(args),
            timeout_action=_timeout_action(args),
            channels=_channels(args, s.migration_channels),
            auto_converge=bool(arg(args, "auto_converge", bool, s.auto_converge)),
            cluster=self.host.cluster,
        )
        job = self.jobs.start(jobs.MIGRATE, dom.name)

        async def open_channel(role: Role) -> RecordChannel:
            transport: ByteTransport
            if tls_ctx is not None:
                transport = await connect_tls(host, port, tls_ctx, s.handshake_timeout)
            else:
                transport = await connect(host, port, s.handshake_timeout)
            return RecordChannel(
                transport, Conversation(role), max_frame=s.max_frame, read_timeout=s.idle_timeout
            )

        async def run() -> MigrationResult:
            try:
                channel = await open_channel(Role.SOURCE)
            except RelocdError as exc:
                result = MigrationResult(domain=name, live=live, migration_id=mid, target=target)
                return result.finish("failed", exc.message)
            except asyncio.CancelledError:
                if job.abort_reason is None:
                    raise
                result = MigrationResult(domain=name, live=live, migration_id=mid, target=target)
                return result.finish("cancelled", job.abort_reason)  # aborted while connecting
            migration = SourceMigration(
                dom,
                channel,
                options,
                journal=self.host.journal,
                migration_id=mid,
                target=target,
                reconnect=lambda: open_channel(Role.QUERY),
                dial_channel=lambda: open_channel(Role.CHANNEL),
                progress=job.progress(progress_to(sink)),
                hooks=self.hooks,
            )
            migration.in_doubt_notice = notice
            self.outgoing[dom.config.uuid] = migration
            job.migration = migration
            return await migration.run()

        structlog.contextvars.bind_contextvars(migration_id=mid)
        loop = asyncio.get_running_loop()
        notice: asyncio.Future[MigrationResult] = loop.create_future()
        job.migration_id = mid
        # named so `relocd settle` can stop it asking, should its peer be gone for good
        task = job.task = self.host.start_operation(run(), name=settling_task_name(mid))

        def settled(t: asyncio.Task[Any], uuid: str = dom.config.uuid) -> None:
            self.outgoing.pop(uuid, None)
            self.jobs.end(job)
            claim.release()
            if not t.cancelled() and t.exception() is None:
                res = t.result()
                if res.status != "completed" and self.host.cluster is not None:  # a stale offer fenced
                    self.host.spawn(withdraw_offer(self.host, uuid, mid))
                self.host.notify("migration_finished", direction="outgoing", status=res.status, result=res.to_json())
            else:
                self.host.notify("migration_finished", direction="outgoing", status="failed", result=None)

        self.host.notify("migration_started", direction="outgoing")

        task.add_done_callback(settled)
        try:
            # shield: a control client that goes away must not cancel the
            # migration; an in-doubt one answers the operator and asks on
            await asyncio.wait({task, notice}, return_when=asyncio.FIRST_COMPLETED)
            if task.done() and task.cancelled():  # relocd settle took it over
                settled_by_hand = MigrationResult(domain=name, live=live, migration_id=mid, target=target)
                result = settled_by_hand.finish("failed", "in doubt, then settled by the operator (relocd settle)")
            else:
                result = task.result() if task.done() else notice.result()
        except BaseException:
            job.finish({"status": "failed", "domain": name, "error": "the migration ended abnormally"})
            raise
        finally:
            structlog.contextvars.unbind_contextvars("migration_id")
        log.info("migration finished", domain=name, status=result.status, error=result.error, migration_id=mid)
        job.finish(result.to_json())
        return result.to_json()


def _timeout(args: dict[str, Any]) -> float | None:
    raw = args.get("timeout")
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or raw < 0:
        raise ConfigError("--timeout: seconds, zero or more")
    return float(raw)


def _channels(args: dict[str, Any], default: int) -> int:
    count = args.get("channels", default)
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 16:
        raise ConfigError("--channels: a whole number from 1 to 16")
    return count


def _timeout_action(args: dict[str, Any]) -> str:
    action = arg(args, "timeout_action", str, TIMEOUT_ABORT)
    if action not in (TIMEOUT_ABORT, TIMEOUT_STOP):
        raise ConfigError(f"--timeout-action: {TIMEOUT_ABORT} or {TIMEOUT_STOP}, not {action!r}")
    return str(action)


def parse_migration_id(text: str) -> str:
    return str(uuidlib.UUID(text))
