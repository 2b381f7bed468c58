"""The daemon's life: startup, serve, shutdown (uvicorn's three phases).

Startup: state dir, journal, drivers (which find the domains that outlived a
previous daemon), the metrics endpoint (if relocd-metrics-address is set),
recovery of unfinished migrations, listeners, control socket, then READY=1
and the watchdog.  Signals only set events: SIGTERM/SIGINT stop, SIGHUP
reloads the config file (``reload``; a bad file changes nothing).  Shutdown,
in order: stop accepting, let in-flight migrations finish for
relocd-shutdown-grace, cancel the rest (which aborts them safely: before GO
the source resumes its copy), close the control socket and the metrics
endpoint, let go of domains without stopping them.
"""

from __future__ import annotations

import asyncio
import faulthandler
import os
import signal
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import ssl

import structlog

from relocd import __version__
from relocd import logs
from relocd.config.settings import Settings, load_settings
from relocd.drivers import DRIVER_NAMES, REQUIRED_DRIVERS, hostinfo, load_driver
from relocd.drivers.base import Domain, Driver
from relocd.engine.journal import Journal
from relocd.engine.reservation import ReservationTable
from relocd.engine.host import Host
from relocd.cluster.handoff import sweep_fenced
from relocd.cluster.registry import cluster_ownership, keep_registered
from relocd.engine.target import TargetSession, expire_reservations
from relocd.engine.target_resume import release_incoming
from relocd.engine.stream import ByteTransport, PeerGone, RecordChannel
from relocd.errors import ConfigError, DriverError, RelocdError
from relocd.protocol.records import Role
from relocd.protocol.state import Conversation
from relocd.server.access import HostsAllow
from relocd.server.control import ControlServer
from relocd.net import AnnounceConfig
from relocd.server.network import NetworkHooks, netns_prefix_for
from relocd.server.listener import RelocationListener, bind_socket
from relocd.server.jobs import MIGRATE
from relocd.server.operations import Operations, format_host_port
from relocd.server import saveops
from relocd.server.recovery import recover_unfinished
from relocd.server.reload import plan_reload
from relocd.server.sdnotify import (
    Activity,
    SdNotifier,
    ServiceStatus,
    keep_informed,
    reloading_fields,
    watchdog_interval_s,
)
from relocd.server.tls import accept_tls, server_context
from relocd.server.transport import SocketTransport

if TYPE_CHECKING:  # prometheus-client is imported only when the endpoint is on
    from relocd.server.metrics import Metrics, MetricsEndpoint

log = structlog.get_logger("relocd.daemon")

#: Pre-authentication limit: nothing a peer sends before HELLO is accepted may
#: make us allocate more than this.
PREAUTH_MAX_FRAME = 4096


class Daemon:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state_dir = Path(settings.state_dir)
        self.drivers: dict[str, Driver] = {}
        self.listeners: list[RelocationListener] = []
        self.control: ControlServer | None = None
        self.stop_event = asyncio.Event()
        #: set by SIGHUP; the main loop reloads the config file
        self.reload_event = asyncio.Event()
        #: the config file as last read, without command-line overrides (see reload.py)
        self.file_settings = settings
        self.systemd = SdNotifier()
        self.service_status: ServiceStatus | None = None
        self._systemd_task: asyncio.Task[None] | None = None
        self._tls_context: ssl.SSLContext | None = None
        self.journal: Journal | None = None
        #: built whole in startup; operations and sessions get it, never the daemon
        self.host: Host | None = None
        self.ops: Operations | None = None
        #: relocd-metrics-address: both None when it is unset
        self.metrics: Metrics | None = None
        self.metrics_endpoint: MetricsEndpoint | None = None

    # -- startup -------------------------------------------------------------------

    async def startup(self) -> None:
        s = self.settings
        if s.config_file is not None:
            try:  # the file alone, to tell what a later SIGHUP changed in it
                self.file_settings = load_settings(s.config_file)
            except ConfigError:
                pass
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.journal = Journal(self.state_dir / "journal.sqlite")
        if s.guest_memory_dir is not None:
            try:
                pages = hostinfo.guest_memory_dir(s.guest_memory_dir)
            except OSError as exc:
                raise ConfigError(
                    f"relocd-guest-memory-dir {s.guest_memory_dir}: {exc.strerror or exc} (it must be a tmpfs directory)"
                ) from None
            log.info("guest memory in files", directory=str(s.guest_memory_dir), pages=pages)
        for name in DRIVER_NAMES:
            try:
                driver = load_driver(name, self.state_dir, memory_dir=s.guest_memory_dir)
                await driver.start()
            except (DriverError, OSError) as exc:
                msg = exc.message if isinstance(exc, RelocdError) else str(exc)
                log.info("driver not available", driver=name, reason=msg)
                continue
            except Exception:
                if name in REQUIRED_DRIVERS:
                    raise
                # An optional driver with a bug must not keep the daemon down.
                log.exception("driver failed to start", driver=name)
                continue
            self.drivers[name] = driver
        host = self.host = Host(
            drivers=self.drivers,
            reservations=ReservationTable(s.reservation_timeout),
            journal=self.journal,
            max_memory=s.max_memory,
            hooks=NetworkHooks(netns_prefix_for(self.state_dir), AnnounceConfig.from_settings(s)),
            cluster=cluster_ownership(s),
        )
        if s.metrics_address is not None:
            from relocd.server.metrics import Metrics, MetricsEndpoint

            # Before recovery and the listeners, so their work is counted; a
            # port it cannot bind keeps the daemon down (ConfigError, one line).
            self.metrics = Metrics(host)
            host.observers.append(self.metrics.observe)
            self.metrics_endpoint = MetricsEndpoint(self.metrics.registry, s.metrics_address)
            self.metrics_endpoint.start()
            log.info("metrics endpoint listening", address=format_host_port(*self.metrics_endpoint.address))
        self.ops = Operations(host, s, lambda: [format_host_port(*lst.address) for lst in self.listeners])
        host.spawn(self._expire_reservations(host))
        if host.cluster is not None:  # the fleet's view (relocd cluster hosts); never gates a handoff
            host.spawn(keep_registered(host, s, lambda: [format_host_port(*lst.address) for lst in self.listeners]))
        await recover_unfinished(host, s)
        await saveops.recover_interrupted(host, s)
        if s.relocation_server:
            sock = bind_socket(s.relocation_address, s.relocation_port)
            listener = RelocationListener(
                sock,
                self._serve_peer,
                hosts_allow=HostsAllow(s.hosts_allow),
                dns_timeout=s.dns_timeout,
                max_connections=max(16, 4 * s.max_incoming),
                on_refused=self._peer_refused,
            )
            listener.start()
            self.listeners.append(listener)
            log.info("relocation server listening", address=listener.address[0], port=listener.address[1])
        if s.relocation_ssl_server:
            self._start_tls_listener()
        self.control = ControlServer(Path(s.control_socket), self.ops.handlers())
        await self.control.start()
        log.info("relocd started", version=__version__, control=str(s.control_socket), drivers=sorted(self.drivers))
        self._start_systemd(host)

    def _start_systemd(self, host: Host) -> None:
        """READY=1, STATUS= kept up to date, and WATCHDOG=1 when systemd asks for it."""
        if not self.systemd.enabled:
            return
        ops = self.ops

        def activity() -> Activity:
            outgoing = sum(1 for job in ops.jobs.all() if job.kind == MIGRATE) if ops else 0
            return Activity(len(self.all_domains()), outgoing, len(host.sessions))

        status = self.service_status = ServiceStatus(self.systemd, activity)
        host.observers.append(status.observe)
        status.update(READY=1, MAINPID=os.getpid())
        watchdog_s = watchdog_interval_s()
        if watchdog_s is not None:
            log.info("systemd watchdog on", ping_every_s=watchdog_s)
        self._systemd_task = asyncio.get_running_loop().create_task(
            keep_informed(self.systemd, status, watchdog_s), name="systemd"
        )

    def _start_tls_listener(self) -> None:
        """xend-relocation-ssl-server: the same service on its own port, TLS first."""
        s = self.settings
        # ConfigError (bad key, cert or CA file) keeps the daemon down; SIGHUP
        # builds it again (a renewed certificate), read by each new handshake
        self._tls_context = server_context(s)

        async def serve_tls_peer(sock: socket.socket, peer: str) -> None:
            ctx = self._tls_context
            assert ctx is not None
            try:
                transport = await accept_tls(sock, ctx, timeout=self.settings.handshake_timeout, peer=peer)
            except PeerGone as exc:
                log.warning("connection refused: TLS handshake failed", peer=peer, error=exc.message)
                self._peer_refused("tls_handshake")
                return
            await self._serve_transport(transport, peer, peer_identity=transport.peer_identity())

        sock = bind_socket(s.relocation_address, s.relocation_ssl_port)
        listener = RelocationListener(
            sock,
            serve_tls_peer,
            hosts_allow=HostsAllow(s.hosts_allow),
            dns_timeout=s.dns_timeout,
            max_connections=max(16, 4 * s.max_incoming),
            name="relocation-ssl",
            on_refused=self._peer_refused,
        )
        listener.start()
        self.listeners.append(listener)
        log.info(
            "TLS relocation server listening",
            address=listener.address[0],
            port=listener.address[1],
            client_certificates="required" if s.ssl_ca_file is not None else "not requested",
        )

    async def _expire_reservations(self, host: Host) -> None:
        """relocd-reservation-timeout, enforced: a quiet source loses its room."""
        period = min(1.0, self.settings.reservation_timeout / 4)
        while True:
            await asyncio.sleep(period)
            expire_reservations(host)
            await sweep_fenced(host, lambda mid: release_incoming(host, mid))

    def all_domains(self) -> list[Domain]:
        return [d for drv in self.drivers.values() for d in drv.domains()]

    # -- main loop and SIGHUP ------------------------------------------------------------

    async def main_loop(self) -> None:
        """Until a stop signal: apply each SIGHUP's reload, one at a time."""
        stop = asyncio.ensure_future(self.stop_event.wait())
        try:
            while not stop.done():
                hup = asyncio.ensure_future(self.reload_event.wait())
                await asyncio.wait({stop, hup}, return_when=asyncio.FIRST_COMPLETED)
                if hup.done():
                    self.reload_event.clear()
                    self.reload()
                else:
                    hup.cancel()
        finally:
            stop.cancel()

    def reload(self) -> bool:
        """Read the config file again and apply what a running daemon can change.

        A file that does not load (or names TLS files that do not) changes
        nothing: one error line, the old settings kept.  Options that only a
        restart applies are logged as not applied.  Migrations in flight
        keep the settings they started with.
        """
        path = self.settings.config_file
        if path is None:
            log.warning("config not reloaded: the daemon was started without a config file")
            return False
        self.systemd.notify(**reloading_fields())
        try:
            new_file = load_settings(path)
            plan = plan_reload(self.settings, self.file_settings, new_file)
            self._apply(plan.settings)
        except (ConfigError, ValueError) as exc:
            error = exc.message if isinstance(exc, RelocdError) else str(exc)
            log.error("config not reloaded, old settings kept", file=str(path), error=error)
            self._ready_again()
            return False
        self.file_settings = new_file
        if plan.needs_restart:
            log.warning("config options not applied until a restart", file=str(path), options=list(plan.needs_restart))
        log.info("config reloaded", file=str(path), applied=list(plan.applied))
        self._ready_again()
        return True

    def _ready_again(self) -> None:
        if self.service_status is not None:
            self.service_status.update(READY=1)
        else:
            self.systemd.notify(READY=1)

    def _apply(self, s: Settings) -> None:
        """Push ``s`` into the parts that copied settings at startup; all or nothing."""
        # Everything that can fail comes first.
        allow = HostsAllow(s.hosts_allow)
        tls = server_context(s) if self._tls_context is not None else None
        logs.set_level(s.log_level)
        if s.log_format != self.settings.log_format:
            logs.configure_logging(s.log_format, s.log_level)
        # Read per connection or per op from here: _serve_transport, the
        # reservation sweep, shutdown, Operations (migrate, save, create).
        self.settings = s
        if self.ops is not None:
            self.ops.settings = s
        if tls is not None:
            self._tls_context = tls
        for listener in self.listeners:
            listener.allow = allow
            listener.dns_timeout = s.dns_timeout
            listener.max_connections = max(16, 4 * s.max_incoming)
        if self.host is not None:
            self.host.max_memory = s.max_memory
            self.host.reservations.timeout_s = s.reservation_timeout
            if isinstance(self.host.hooks, NetworkHooks):
                self.host.hooks.announce = AnnounceConfig.from_settings(s)

    # -- incoming peers ----------------------------------------------------------------

    def _peer_refused(self, reason: str) -> None:
        """The listeners turned a peer away (relocd_peers_refused_total)."""
        if self.metrics is not None:
            self.metrics.peer_refused(reason)

    async def _serve_peer(self, sock: socket.socket, peer: str) -> None:
        await self._serve_transport(SocketTransport(sock), peer)

    async def _serve_transport(
        self, transport: ByteTransport, peer: str, *, peer_identity: str | None = None
    ) -> None:
        assert self.host is not None
        s = self.settings
        channel = RecordChannel(
            transport,
            Conversation(Role.TARGET),
            max_frame=PREAUTH_MAX_FRAME,
            read_timeout=s.handshake_timeout,
        )
        session = TargetSession(
            channel,
            self.host,
            peer=peer,
            peer_identity=peer_identity,
            max_frame=s.max_frame,
            idle_timeout=s.idle_timeout,
            max_incoming=s.max_incoming,
        )
        await session.run()

    # -- shutdown -----------------------------------------------------------------------

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop; ``grace`` (default relocd-shutdown-grace) bounds the wait for work in flight."""
        loop = asyncio.get_running_loop()
        grace = self.settings.shutdown_grace if grace is None else grace
        deadline = loop.time() + grace
        if self.service_status is not None:
            self.service_status.phase = "shutting down"
            self.service_status.update(STOPPING=1)
        else:
            self.systemd.notify(STOPPING=1, STATUS="shutting down")
        log.info("shutting down", grace_s=grace)
        for listener in self.listeners:
            await listener.stop_accepting()
        if self.ops is not None:
            await self.ops.drain(max(0.0, deadline - loop.time()))
        for listener in self.listeners:
            await listener.drain(max(0.0, deadline - loop.time()))
        background = set(self.host.background) if self.host is not None else set()
        for t in background:
            t.cancel()
        if background:
            await asyncio.wait(background, timeout=5)
        if self.control is not None:
            await self.control.close()
        if self.metrics_endpoint is not None:  # before the journal its gauges read closes
            await asyncio.to_thread(self.metrics_endpoint.stop)
        for driver in self.drivers.values():
            await driver.close()
        if self.journal is not None:
            self.journal.close()
        if self._systemd_task is not None:  # the watchdog is fed to the very end
            self._systemd_task.cancel()
            await asyncio.gather(self._systemd_task, return_exceptions=True)
        log.info("stopped")
        self.systemd.close()


async def _main(settings: Settings) -> int:
    daemon = Daemon(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.stop_event.set)
    # From the start: SIGHUP's default action would end the daemon (and
    # systemd counts a SIGHUP death as clean: no Restart=on-failure).  One
    # arriving during startup is applied once the daemon serves.
    loop.add_signal_handler(signal.SIGHUP, daemon.reload_event.set)
    try:
        await daemon.startup()
    except RelocdError as exc:
        log.error("cannot start", error=exc.message)
        await daemon.shutdown(grace=0)
        raise
    await daemon.main_loop()
    await daemon.shutdown()
    return 0


def run_daemon(settings: Settings) -> int:
    """Entry point of `relocd serve`."""
    from relocd.logs import configure_logging

    configure_logging(settings.log_format, settings.log_level)
    # The watchdog's SIGABRT (or a crash in C code) writes every thread's
    # Python stack to stderr, the journal: it shows where the loop hung.
    faulthandler.enable()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - a declared dependency
        return asyncio.run(_main(settings))
    if os.environ.get("RELOCD_NO_UVLOOP"):
        return asyncio.run(_main(settings))
    return uvloop.run(_main(settings))
