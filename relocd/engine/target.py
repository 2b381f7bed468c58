"""The receiving side of a migration, and the answer to recovery queries.

A target never resumes a domain without GO and never throws away a prepared
domain on its own: once PREPARED is sent, only the source decides (GO or
ABORT, on this connection or on a later QUERY connection).  Before PREPARED,
any failure destroys the half-built domain and releases the reservation.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid as uuidlib
from typing import TypeVar

import structlog

from relocd.cluster import handoff as cluster
from relocd.config.domain import config_from_sxp
from relocd.drivers.base import INCOMING_SUFFIX, Domain, DomainConfig, Driver
from relocd.engine.channels import ReceiveChannels, serve_join
from relocd.engine.faults import fault_point
from relocd.engine.host import Host
from relocd.engine.journal import Phase
from relocd.engine.reservation import (
    ReservationRequest,
    check_reservation,
    find_unreachable_disks,
)
from relocd.engine.result import Progress, no_progress
from relocd.engine.handshake import answer_hello, digest_algo_for, host_id
from relocd.engine.stream import PeerGone, RecordChannel
from relocd.engine.target_resume import finish_resume, outcome_of, release_incoming
from relocd.engine.transfer import Landing, transfer_for
from relocd.errors import (
    AccessDenied,
    ConfigError,
    MigrationAborted,
    ProtocolError,
    Reason,
    RelocdError,
    ReservationRefused,
)
from relocd.protocol.channel_records import MAX_CHANNELS
from relocd.protocol.records import (
    Record,
    Abort,
    Config,
    DigestAlgo,
    Done,
    Feature,
    Go,
    Outcome,
    OutcomeState,
    Prepared,
    Query,
    Refuse,
    Reserve,
    Reserved,
    Resumed,
    Role,
)

log = structlog.get_logger("relocd.target")

#: what the daemon lends each incoming session: the host (engine/host.py)
TargetContext = Host


class TargetSession:
    """One incoming connection: a migration or a recovery query."""

    def __init__(
        self,
        channel: RecordChannel,
        ctx: TargetContext,
        *,
        peer: str,
        peer_identity: str | None = None,
        max_frame: int = 16 << 20,
        idle_timeout: float | None = None,
        max_incoming: int = 4,
        progress: Progress = no_progress,
    ) -> None:
        self.channel = channel
        self.ctx = ctx
        self.peer = peer
        #: the source's TLS certificate identity (None over plain TCP)
        self.peer_identity = peer_identity
        self.max_frame = max_frame
        self.idle_timeout = idle_timeout
        self.max_incoming = max_incoming
        self.progress = progress
        self.mid = ""
        self.log = log.bind(peer=peer)
        self.domain: Domain | None = None
        self.request: ReservationRequest | None = None
        self._reserved = False
        self._prepared = False
        #: this session wrote the journal entry for self.mid (and may close it)
        self._journaled = False
        self._hello_sent = False
        self.digest_algo = DigestAlgo.SHA256
        self._peer_features = 0
        #: COMMIT in to PREPARED out, ms: the target's share of the downtime's "prepare"
        self._prepare_ms: float | None = None
        #: the extra page channels granted at RESERVE (None: the main connection only)
        self.channels: ReceiveChannels | None = None
        self._task: asyncio.Task[object] | None = None
        self._expired = False

    def expire(self) -> None:
        """The reservation ran out (the source went quiet): end the session, which cleans up."""
        self._expired = True
        if self._task is not None:
            self._task.cancel()

    async def run(self) -> None:
        self._task = asyncio.current_task()
        try:
            hello = await answer_hello(self.channel)
            self._hello_sent = True
            self.digest_algo = digest_algo_for(hello.features)
            self._peer_features = hello.features
            await fault_point("target", "hello")
            # Authenticated and speaking our protocol: lift the pre-auth limits.
            self.channel.max_frame = self.max_frame
            self.channel.read_timeout = self.idle_timeout
            self.mid = str(uuidlib.UUID(bytes=hello.migration_id))
            self.log = self.log.bind(migration_id=self.mid)
            # every line this session causes (drivers, hooks) carries the id too
            structlog.contextvars.bind_contextvars(migration_id=self.mid)
            if hello.role == Role.QUERY:
                await self._answer_query()
            elif hello.role == Role.CHANNEL:
                await serve_join(self.channel, self._grant_for, peer=self.peer, peer_identity=self.peer_identity)
            else:
                await self._receive()
        except asyncio.CancelledError:
            if self._expired and self._task is not None and self._task.uncancel() == 0:
                await self._fail(
                    MigrationAborted(
                        f"reservation expired: the source sent nothing for {self.ctx.reservations.timeout_s:g} s",
                        reason=Reason.TIMEOUT,
                    )
                )
                return
            await self._fail(MigrationAborted("daemon shutting down", reason=Reason.SHUTDOWN))
            raise
        except (RelocdError, OSError) as exc:
            await self._fail(exc)
        except Exception as exc:  # a bug: still clean up what this session built
            self.log.exception("incoming session failed on a bug")
            await self._fail(RelocdError(f"internal error: {type(exc).__name__}: {exc}", reason=Reason.INTERNAL))
        finally:
            if self.channels is not None:
                self.channels.release()  # their connections may close now
            if self.ctx.sessions.get(self.mid) is self:
                del self.ctx.sessions[self.mid]
            await self.channel.close()
            if self._journaled:
                entry = self.ctx.journal.get(self.mid)
                status = (entry.outcome if entry.finished else "in-doubt") if entry is not None else "failed"
                self.ctx.notify(
                    "migration_finished", direction="incoming", status=status or "failed", result=None,
                    domain=self.request.name if self.request else None, peer=self.peer, migration_id=self.mid,
                    live=entry.live if entry else None, started_at=entry.started_at if entry else None,
                    error=entry.error if entry else None,
                )  # fmt: skip

    # -- migration -------------------------------------------------------------

    async def _receive(self) -> None:
        ch = self.channel
        if self.ctx.journal.get(self.mid) is not None:
            # A replayed or forged HELLO: the entry belongs to another session
            # (live or finished); refuse without touching it.
            raise MigrationAborted(
                f"migration id {self.mid} is already known here", reason=Reason.PROTOCOL
            )
        record = expect(await ch.recv(), Reserve)
        await self._reserve(record)
        await fault_point("target", "reserve")
        config_rec = expect(await ch.recv(), Config)
        assert self.request is not None
        driver = self.ctx.drivers[self.request.driver]
        transfer = transfer_for(driver)
        config = self._checked_config(config_rec.text)
        if self.domain is not None:  # built at RESERVE: it adopts the full config
            await self.domain.configure(config)
        await fault_point("target", "config")
        received = await transfer.receive(
            ch,
            Landing(
                driver=driver,
                config=config,
                name=config.name + INCOMING_SUFFIX,
                reservations=self.ctx.reservations,
                reservation_id=self.mid,
                register=self._register,
                domain=self.domain,
                progress=self.progress,
                faults="target",
                hash_algo=self.digest_algo if self.request.verify else None,
                channels=self.channels,
            ),
        )
        committed_at = time.monotonic()
        if await received.memory_matches() is False:
            raise MigrationAborted("memory digest mismatch at the stop point", reason=Reason.VERIFY)
        await received.load_state()
        domain = received.domain
        self.ctx.journal.set_phase(self.mid, Phase.PREPARED)
        self.ctx.reservations.pin(self.mid)  # the source decides now, not the clock
        self._prepared = True
        self.ctx.in_doubt[self.mid] = domain
        self._prepare_ms = round((time.monotonic() - committed_at) * 1000, 3)
        await ch.send(Prepared())
        await fault_point("target", "prepared")
        await self.progress(phase="prepared")
        try:
            decision = await ch.recv()
        except (RelocdError, OSError) as exc:
            # The source decides; keep the prepared domain paused until it asks.
            self.log.warning("link lost while prepared; waiting for the source to ask", error=str(exc))
            self.domain = None  # not ours to clean up any more
            return
        if isinstance(decision, Abort):
            await self._drop_prepared(self.mid, f"source aborted: {decision.message}")
            return
        if not isinstance(decision, Go):
            raise ProtocolError(f"{type(decision).__name__} where GO or ABORT was due")
        await fault_point("target", "go")
        self.domain = None  # from GO on, _go owns the copy's fate
        await self._go(self.mid, ch)

    def _grant_for(self, migration_id: str) -> ReceiveChannels | None:
        """The channels an incoming migration was granted, for a JOIN naming it."""
        session = self.ctx.sessions.get(migration_id)
        return session.channels if isinstance(session, TargetSession) else None

    def _grant_channels(self, req: ReservationRequest, driver: Driver) -> dict[str, object]:
        """RESERVED's channel grant: how many, and the token each JOIN must show."""
        if req.channels < 2 or not self._peer_features & Feature.CHANNELS or not transfer_for(driver).stripes:
            return {}
        grant = ReceiveChannels(
            min(req.channels, MAX_CHANNELS), os.urandom(16), peer=self.peer, peer_identity=self.peer_identity
        )
        self.channels = grant
        return {"channels": grant.count, "channel_token": grant.token.hex()}

    def _register(self, domain: Domain) -> None:
        """The incoming domain exists now: ours to destroy on failure, and listed."""
        self.domain = domain
        self.ctx.incoming[self.mid] = domain

    async def _reserve(self, record: Reserve) -> None:
        req = ReservationRequest.from_wire(record.request)
        ctx = self.ctx
        driver = ctx.drivers.get(req.driver)
        try:
            if driver is None:
                raise ReservationRefused(f"driver {req.driver!r} is not available on this host", reason=Reason.DRIVER)
            cluster.target_reserve_check(ctx, req)
            caps = await driver.capabilities()
            unreachable = await find_unreachable_disks(req, driver)
            # From here to reservations.add there is no await: concurrent
            # RESERVEs see each other's reservations, never the same free room.
            if len(ctx.reservations.all()) >= self.max_incoming:
                raise ReservationRefused(
                    f"too many incoming migrations (limit {self.max_incoming})", reason=Reason.BUSY
                )
            domains = ctx.all_domains()
            if driver.shared_hypervisor and req.host_id is not None and req.host_id == host_id():
                # Two daemons on one hypervisor (a lab, or a daemon per dom0
                # address): the source's own copy is visible here too and is
                # not a clash -- only a second domain of that name would be.
                domains = [d for d in domains if d.config.uuid != req.uuid]
            check_reservation(
                req,
                caps,
                max_memory=ctx.max_memory,
                reserved_bytes=ctx.reservations.reserved_bytes,
                existing_names={d.name for d in domains} | ctx.reservations.names,
                existing_uuids={d.config.uuid for d in domains} | ctx.reservations.uuids,
                unreachable_disks=unreachable,
            )
        except ReservationRefused as exc:
            self.log.warning("reservation refused", reason=exc.reason.name, error=exc.message)
            await self.channel.send(Refuse(exc.reason, exc.message))
            raise
        ctx.reservations.add(self.mid, req)
        ctx.sessions[self.mid] = self
        self.request = req
        self._reserved = True
        ctx.journal.begin(
            self.mid, "target", req.name, req.uuid, self.peer, req.live, peer_identity=self.peer_identity
        )
        self._journaled = True
        try:
            # Set the memory aside for real: build the domain, paused and
            # empty, before the source commits to anything.
            if transfer_for(driver).builds_at_reserve:
                await self._build(req, driver)
        except RelocdError as exc:
            self.log.warning("could not build the incoming domain", error=exc.message)
            await self.channel.send(Refuse(Reason.DRIVER_ERROR, f"target could not build the domain: {exc.message}"))
            raise ReservationRefused(exc.message, reason=Reason.DRIVER_ERROR) from None
        self.log.info("reservation granted", domain=req.name, memory=req.memory_bytes)
        ctx.notify("migration_started", direction="incoming")
        await self.channel.send(
            Reserved({
                "reservation": self.mid,
                "expires_ms": int(ctx.reservations.timeout_s * 1000),
                # what is left after this one: evacuate spreads domains by it
                "free_bytes": max(0, caps.free_memory_bytes - ctx.reservations.reserved_bytes),
                **self._grant_channels(req, driver),
                **cluster.reserved_info(ctx),
            })  # fmt: skip
        )
        # The reservation expires when the source goes quiet this long: every
        # record touches it, and a read that waits longer ends the session,
        # which destroys the half-built domain and releases the memory.
        timeouts = [t for t in (self.channel.read_timeout, ctx.reservations.timeout_s) if t]
        self.channel.read_timeout = min(timeouts) if timeouts else None

    async def _build(self, req: ReservationRequest, driver: Driver) -> Domain:
        if req.memory_bytes % (1 << 20):
            raise ReservationRefused("domain memory must be a whole number of MiB", reason=Reason.LIMIT)
        provisional = DomainConfig(
            name=req.name + INCOMING_SUFFIX,
            uuid=req.uuid,
            memory_mib=req.memory_bytes >> 20,
            vcpus=req.vcpus,
            driver=req.driver,
            cpu_features=req.cpu_features,
        )
        domain = await driver.create(provisional, start=False)
        self._register(domain)
        return domain

    def _checked_config(self, sxp_text: str) -> DomainConfig:
        """CONFIG's domain config, which must match what was reserved."""
        try:
            config = config_from_sxp(sxp_text)
        except ConfigError as exc:
            raise ProtocolError(f"bad domain config: {exc.message}") from None
        req = self.request
        assert req is not None
        if (config.name, config.uuid, config.memory_bytes, config.vcpus, config.driver) != (
            req.name,
            req.uuid,
            req.memory_bytes,
            req.vcpus,
            req.driver,
        ):
            raise ProtocolError("domain config does not match the reservation")
        return config

    async def _go(self, mid: str, channel: RecordChannel) -> None:
        """GO received (on the migration's connection or after a QUERY): become the one running copy.

        Idempotent by state: the journal moves PREPARED -> RESUMING before the
        first await, so a second GO for the same migration finds RESUMING or
        RESUMED and gets the first one's answer instead of a second resume.
        """
        journal = self.ctx.journal
        entry = journal.get(mid)
        running = self.ctx.resuming.get(mid)
        if running is not None:
            answer = await asyncio.shield(running)
        elif entry is not None and entry.phase == Phase.PREPARED and not entry.finished:
            journal.set_phase(mid, Phase.RESUMING)  # the intent, before rename and resume
            future: asyncio.Future[Resumed] = asyncio.get_running_loop().create_future()
            self.ctx.resuming[mid] = future
            try:
                answer = await self._resume_prepared(mid)
                future.set_result(answer)
            except BaseException as exc:
                future.set_exception(exc)
                future.exception()  # retrieved: a waiter may not exist
                raise
            finally:
                self.ctx.resuming.pop(mid, None)
        elif entry is not None and entry.phase == Phase.RESUMED:
            answer = Resumed(True, {"repeated": True})
        else:
            raise MigrationAborted(
                f"GO for migration {mid}, which is {entry.phase if entry else 'unknown'} here",
                reason=Reason.PROTOCOL,
            )
        if answer.ok and self._prepare_ms is not None and mid == self.mid:
            answer = Resumed(True, {**answer.details, "prepare_ms": self._prepare_ms})
        await channel.send(answer)
        if not answer.ok:
            return
        await fault_point("target", "resumed")
        try:
            done = await channel.recv()
            if not isinstance(done, Done):
                raise ProtocolError(f"{type(done).__name__} where DONE was due")
        except (RelocdError, OSError):
            pass  # we run the domain either way; DONE only tidies the journal
        entry = journal.get(mid)
        if entry is not None and not entry.finished:
            journal.finish(mid, "completed")

    async def _resume_prepared(self, mid: str) -> Resumed:
        """RESUMING is journaled: rename, resume, journal RESUMED (or undo and ABORTED)."""
        domain = self.ctx.in_doubt.get(mid) or self.ctx.incoming.get(mid)
        if domain is None:
            entry = self.ctx.journal.get(mid)
            domain = self.ctx.migration_copy(entry) if entry is not None else None
        if domain is None:
            self.ctx.journal.set_phase(mid, Phase.ABORTED)
            self.ctx.journal.finish(mid, "failed", "prepared domain vanished before GO")
            self._release(mid)
            return Resumed(False, {"error": "prepared domain vanished before GO"})
        return await finish_resume(self.ctx, mid, domain, self.log, release=self._release)

    def _release(self, mid: str) -> None:
        release_incoming(self.ctx, mid)
        if mid == self.mid:
            self._reserved = False
            self.domain = None

    # -- recovery queries --------------------------------------------------------

    async def _answer_query(self) -> None:
        ch = self.channel
        query = expect(await ch.recv(), Query)
        mid = str(uuidlib.UUID(bytes=query.migration_id))
        self.mid = mid
        self.log = self.log.bind(migration_id=mid)
        entry = self.ctx.journal.get(mid)
        if entry is not None and not self._bound_to_peer(entry.peer, entry.peer_identity):
            # Only the host that reserved a migration may ask about it or
            # decide it; anyone else learns nothing (not even UNKNOWN, which
            # would tell a real source to resume its own copy).
            self.log.warning("recovery query refused: not the migration's source", bound_to=entry.peer)
            raise AccessDenied(f"migration {mid} belongs to another peer", reason=Reason.ACCESS)
        state = outcome_of(self.ctx, mid)
        self.log.info("recovery query", state=state.name)
        await ch.send(Outcome(query.migration_id, state))
        if state == OutcomeState.RESUMED:
            await self._await_done(mid)
            return
        if state != OutcomeState.PREPARED:
            return
        try:
            decision = await ch.recv()
        except PeerGone:
            return
        if isinstance(decision, Abort):
            if self.ctx.resuming.get(mid) is not None:
                raise MigrationAborted("ABORT after GO", reason=Reason.PROTOCOL)
            await self._drop_prepared(mid, decision.message)
            return
        if isinstance(decision, Done):
            return
        if not isinstance(decision, Go):
            raise ProtocolError(f"{type(decision).__name__} where GO or ABORT was due")
        await self._go(mid, ch)

    async def _await_done(self, mid: str) -> None:
        """The source heard RESUMED (and destroys its copy): its DONE closes our entry."""
        with contextlib.suppress(RelocdError, OSError, TimeoutError):
            async with asyncio.timeout(10):
                if not isinstance(await self.channel.recv(), Done):
                    return
            entry = self.ctx.journal.get(mid)
            if entry is not None and not entry.finished:
                self.ctx.journal.finish(mid, "completed")

    def _bound_to_peer(self, peer: str, identity: str | None) -> bool:
        """Is this connection from the migration's source (address, and certificate if it had one)?"""
        if identity is not None and identity != self.peer_identity:
            return False
        return peer == self.peer

    async def _drop_prepared(self, mid: str, message: str) -> None:
        """The source decided ABORT for a prepared copy: destroy it, free its room."""
        self.log.info("source aborted an in-doubt migration", error=message)
        entry = self.ctx.journal.get(mid)
        domain = self.ctx.in_doubt.get(mid) or (self.ctx.migration_copy(entry) if entry else None)
        if domain is not None and domain.name.endswith(INCOMING_SUFFIX):
            await domain.destroy()
            await self.ctx.hooks.destroyed(domain)
        self._release(mid)
        if entry is not None and not entry.finished:
            self.ctx.journal.set_phase(mid, Phase.ABORTED)
            self.ctx.journal.finish(mid, "rolled-back", message)

    # -- failure ---------------------------------------------------------------------

    async def _fail(self, exc: BaseException) -> None:
        msg = exc.message if isinstance(exc, RelocdError) else str(exc)
        reason = exc.reason if isinstance(exc, RelocdError) else Reason.INTERNAL
        if not isinstance(exc, ReservationRefused):
            self.log.warning("incoming migration failed", error=msg, reason=reason.name)
        # An ABORT only means something inside a relocd stream: before our
        # preamble and HELLO went out, the peer gets nothing but the close.
        if self._hello_sent and not isinstance(exc, (PeerGone, ReservationRefused)) and not (
            isinstance(exc, MigrationAborted) and "source aborted" in msg
        ):
            try:
                async with asyncio.timeout(2):
                    await self.channel.send(Abort(reason, msg[:200]))
            except (RelocdError, OSError, TimeoutError, AssertionError):
                pass
        entry = self.ctx.journal.get(self.mid) if self._journaled else None
        if entry is not None and entry.phase in (Phase.PREPARED, Phase.RESUMING, Phase.STARTING, Phase.RESUMED):
            # Past PREPARED only the source decides (GO or ABORT, here or on a
            # later QUERY): keep the prepared copy and its reservation.
            if entry.phase == Phase.RESUMED and not entry.finished:
                self.ctx.journal.finish(self.mid, "completed", f"after resume: {msg}")
            return
        domain = self.domain
        if domain is not None:
            try:
                await domain.destroy()
                await self.ctx.hooks.destroyed(domain)
            except RelocdError as e:
                self.log.error("could not destroy half-built domain", error=e.message)
            self.ctx.incoming.pop(self.mid, None)
            self.ctx.in_doubt.pop(self.mid, None)
            self.domain = None
        if self._reserved:
            self.ctx.reservations.release(self.mid)
            self._reserved = False
        if entry is not None and not entry.finished:
            self.ctx.journal.set_phase(self.mid, Phase.ABORTED)
            self.ctx.journal.finish(self.mid, "rolled-back", msg)


def expire_reservations(ctx: TargetContext) -> int:
    """End the sessions whose source went quiet past the reservation timeout; how many."""
    gone = ctx.reservations.expired()
    for res in gone:
        session = ctx.sessions.get(res.migration_id)
        log.warning("reservation expired", migration_id=res.migration_id, domain=res.request.name)
        if session is not None:
            session.expire()
    return len(gone)


_R = TypeVar("_R", bound=Record)


def expect(record: object, kind: type[_R]) -> _R:
    """The record the conversation is at, or why not: an ABORT from the source ends it as such.

    The state machine lets only ``kind`` or ABORT through here, so anything
    else is a bug in the table, said as a protocol error (never an assert,
    which ``python -O`` drops).
    """
    if isinstance(record, kind):
        return record
    if isinstance(record, Abort):
        raise MigrationAborted(f"source aborted: {record.message}", reason=record.reason)
    raise ProtocolError(f"{type(record).__name__} where {kind.__name__} was due")
