"""The xen driver: Xen domains of this dom0, seen through libxenctrl, xenstore and xl.

Listing (every domain but dom0, refreshed from the hypervisor on each call,
so domains made with ``xl create`` show up), reading a domain's libxl
configuration, pause/resume, destroy, rename, creating a booted PV domain,
and host capabilities (free memory from Xen, Xen's PV CPU featureset).

Moving and saving: a PV guest's memory holds page tables full of machine
frame numbers that only Xen's save/restore code (libxenguest) can translate,
so these domains are ``transfer = "stream"`` domains (engine/streamed.py,
engine/savefile_stream.py): ``send_stream`` runs libxenguest's save with
relocd's policy answering each round, ``receive_stream`` feeds the stream to
``xl restore -p``, ``cancel_send`` resumes a suspended guest.  The page-path
methods (memory, dirty log, state blob) refuse with a DriverError that says
so.  Lab-tested in tests/system/test_xen.py and test_xen_hosts.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, ClassVar, cast

from pydantic import ValidationError

from relocd.drivers.base import (
    STREAM,
    DirtyBitmap,
    Domain,
    DomainConfig,
    DomainState,
    Driver,
    HostCaps,
)
from relocd.drivers.hostinfo import bridges
from relocd.drivers.xen import config as xencfg
from relocd.drivers.xen import features, libxc, stream, xl
from relocd.drivers.xen.guestsave import GuestSaver
from relocd.drivers.xen.precopy import DecisionOnly, PolicyBridge, RoundDecision
from relocd.engine.policy import PrecopyPolicy, RoundStats
from relocd.errors import DomainExists, DriverError

log = logging.getLogger(__name__)

NOT_MOVABLE = (
    "xen driver: a Xen domain's memory and state travel only in Xen's own save stream, "
    "not through relocd's page path (see docs/xen.md)"
)
#: domains whose name relocd cannot carry are left out of the list
_DOM0 = 0


#: Where a Xen dom0 exposes the hypercall interface.
XEN_PRIVCMD = ("/dev/xen/privcmd", "/proc/xen/privcmd")


class XenDomain(Domain):
    """One domU, by domid; its config is refreshed from xenstore on every listing."""

    #: how it moves: the driver produces a self-describing stream (docs/xen.md, the seam change)
    transfer: ClassVar[str] = STREAM
    emulated_vifs: ClassVar[bool] = False

    def __init__(self, driver: XenDriver, domid: int, config: DomainConfig) -> None:
        self._driver = driver
        self.domid = domid
        self.config = config
        self.destroyed = False
        self._saver: GuestSaver | None = None

    def __repr__(self) -> str:
        return f"<XenDomain {self.name} domid={self.domid}>"

    def _info(self) -> libxc.DomInfo:
        info = self._driver.ctrl.domain(self.domid)
        if info is None or info.uuid != self.config.uuid:
            raise DriverError(f"xen driver: domain {self.name} (domid {self.domid}) is gone")
        return info

    @property
    def state(self) -> DomainState:
        return DomainState.PAUSED if self._info().paused else DomainState.RUNNING

    async def pause(self) -> None:
        await asyncio.to_thread(self._driver.ctrl.pause, self.domid)

    async def resume(self) -> None:
        await asyncio.to_thread(self._driver.ctrl.unpause, self.domid)

    async def destroy(self) -> None:
        if self.destroyed:
            return
        if await asyncio.to_thread(self._driver.ctrl.domain, self.domid) is not None:
            await xl.destroy(self.domid)
        self.destroyed = True
        self._driver.forget(self)

    async def rename(self, new_name: str) -> None:
        try:
            renamed = self.config.model_copy(update={"name": new_name})
            DomainConfig.model_validate(renamed.model_dump())
        except ValidationError:
            raise DriverError(f"xen driver: bad domain name {new_name!r}") from None
        await xl.rename(self.domid, new_name)
        self.config = renamed

    async def libxl_config(self) -> dict[str, Any]:
        """libxl's full configuration of this domain (``xl list -l``)."""
        return await xl.domain_config_json(self.domid)

    async def read_config(self) -> DomainConfig:
        """The domain's configuration as libxl has it (vifs, boot triple), kept as ``config``."""
        cfg = xencfg.from_libxl_json(await self.libxl_config())
        if cfg.uuid != self.config.uuid:
            raise DriverError(f"xen driver: domain {self.name} (domid {self.domid}) is gone")
        self.config = cfg
        return cfg

    async def stats(self) -> dict[str, Any]:
        info = await asyncio.to_thread(self._info)
        return {
            "domid": self.domid,
            "cpu_time_s": info.cpu_time_ns / 1e9,
            "tot_pages": info.tot_pages,
            "paused": info.paused,
            "shutdown": info.shutdown,
        }

    # -- the stream seam (engine/streamed.py, engine/savefile_stream.py) -------

    async def send_stream(
        self,
        live: bool,
        decide: PrecopyPolicy | Callable[[RoundStats], str | None],
        sink: Callable[[bytes], Coroutine[Any, Any, None]],
        on_round: Callable[[RoundDecision], Coroutine[Any, Any, None]] | None = None,
    ) -> list[RoundDecision]:
        """Run libxenguest's save into ``sink``; returns the rounds, with the domain suspended.

        relocd's policy (``decide``) answers every precopy round; ``sink``
        and ``on_round`` run on the caller's event loop, and the save waits
        for each (back-pressure).  Cancelling the caller aborts the save and
        resumes the domain.
        """
        loop = asyncio.get_running_loop()
        if hasattr(decide, "should_stop"):
            policy = cast(PrecopyPolicy, decide)
        else:
            policy = DecisionOnly(decide)

        caller = stream.LoopCaller(loop)

        def report(r: RoundDecision) -> None:
            if on_round is not None:
                caller.call(on_round(r))

        bridge = PolicyBridge(policy, on_round=report)
        saver = self._saver = GuestSaver(self._driver.ctrl, self._driver.store)

        def push(chunk: bytes) -> None:
            caller.call(sink(chunk))

        job = asyncio.ensure_future(asyncio.to_thread(stream.send_stream, saver, self.domid, push, bridge, live=live))
        try:
            await asyncio.shield(job)
        except asyncio.CancelledError:
            bridge.cancel()  # ABORT at libxenguest's next question
            caller.cut()  # and no waiting on a transport that will not take the rest
            with contextlib.suppress(DriverError):
                await job
            await self.cancel_send()
            raise
        return bridge.rounds

    async def cancel_send(self) -> None:
        """Undo send_stream's suspend: the domain runs here again (before GO only)."""
        saver = self._saver or GuestSaver(self._driver.ctrl, self._driver.store)
        await asyncio.to_thread(saver.resume, self.domid)

    async def undo_send(self) -> None:
        # A suspended PV guest does not come back with unpause.
        await self.cancel_send()

    # -- the page path: not for Xen domains (docs/xen.md) ----------------------

    def memory(self) -> memoryview:
        raise DriverError(NOT_MOVABLE)

    async def dirty_log_start(self) -> None:
        raise DriverError(NOT_MOVABLE)

    async def dirty_log_fetch(self) -> DirtyBitmap:
        raise DriverError(NOT_MOVABLE)

    async def dirty_log_stop(self) -> None:
        raise DriverError(NOT_MOVABLE)

    async def save_state(self) -> bytes:
        raise DriverError(NOT_MOVABLE)

    async def load_state(self, blob: bytes) -> None:
        raise DriverError(NOT_MOVABLE)


class XenDriver(Driver):
    """The domUs of the dom0 this daemon runs in."""

    name = "xen"
    #: incoming domains are built from the stream (receive_stream), not at RESERVE
    transfer: ClassVar[str] = STREAM
    #: every daemon in this dom0 sees every domU (xl's view is host-wide)
    shared_hypervisor: ClassVar[bool] = True

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir)
        self._ctrl: libxc.XenCtrl | None = None
        self._store: libxc.XenStore | None = None
        self._domains: dict[int, XenDomain] = {}
        self._lock = threading.Lock()

    @property
    def ctrl(self) -> libxc.XenCtrl:
        if self._ctrl is None:
            raise DriverError("xen driver: not started")
        return self._ctrl

    @property
    def store(self) -> libxc.XenStore:
        if self._store is None:
            raise DriverError("xen driver: not started")
        return self._store

    async def start(self) -> None:
        if not any(os.path.exists(p) for p in XEN_PRIVCMD):
            # Not a Xen dom0: don't even load libxenctrl (it complains on stderr).
            raise DriverError("xen driver: not a Xen dom0 (no privcmd device)")

        def open_handles() -> None:
            self._ctrl = libxc.XenCtrl()
            try:
                self._store = libxc.XenStore()
            except DriverError:
                self._ctrl.close()
                self._ctrl = None
                raise

        await asyncio.to_thread(open_handles)
        found = self.domains()
        log.info("xen driver: %d domain(s): %s", len(found), ", ".join(d.name for d in found))

    async def close(self) -> None:
        with self._lock:
            self._domains = {}
        for handle in (self._store, self._ctrl):
            if handle is not None:
                handle.close()
        self._store = self._ctrl = None

    def _config_of(self, info: libxc.DomInfo) -> DomainConfig | None:
        """Name, memory and vCPUs from xenstore and the hypervisor (cheap: no xl run)."""
        assert self._store is not None
        base = f"/local/domain/{info.domid}"
        name = self._store.read(f"{base}/name")
        if name is None:
            return None  # still being built (or torn down) by the toolstack
        static_max_kb = self._store.read(f"{base}/memory/static-max")
        memory_mib = int(static_max_kb) // 1024 if static_max_kb else info.max_pages >> 8
        try:
            return DomainConfig(
                name=name,
                uuid=info.uuid,
                memory_mib=max(1, memory_mib),
                vcpus=info.max_vcpu_id + 1,
                driver=self.name,
                extra={xencfg.TYPE: info.guest_type},
            )
        except ValidationError:
            log.warning("xen driver: leaving out domain %d: relocd cannot carry its name %r", info.domid, name)
            return None

    def domains(self) -> list[Domain]:
        if self._ctrl is None:
            return []
        infos = [i for i in self.ctrl.domains() if i.domid != _DOM0 and not i.dying]
        with self._lock:
            current: dict[int, XenDomain] = {}
            for info in infos:
                config = self._config_of(info)
                if config is None:
                    continue
                known = self._domains.get(info.domid)
                if known is not None and known.config.uuid == info.uuid:
                    if known.config.name != config.name or known.config.memory_mib != config.memory_mib:
                        known.config = known.config.model_copy(
                            update={"name": config.name, "memory_mib": config.memory_mib}
                        )
                    current[info.domid] = known
                else:
                    current[info.domid] = XenDomain(self, info.domid, config)
            self._domains = current
            return list(current.values())

    def forget(self, domain: XenDomain) -> None:
        with self._lock:
            if self._domains.get(domain.domid) is domain:
                del self._domains[domain.domid]

    async def create(self, config: DomainConfig, *, start: bool = True) -> XenDomain:
        if config.driver != self.name:
            raise DriverError(f"domain {config.name} wants driver {config.driver!r}, not {self.name!r}")
        if not start:
            raise DriverError(NOT_MOVABLE)
        for d in self.domains():
            if d.name == config.name or d.config.uuid == config.uuid:
                raise DomainExists(f"domain {d.name} ({d.config.uuid}) already exists")
        text = xencfg.to_xl_config(config)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix=f"{config.name}.", suffix=".cfg", dir=self.state_dir)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            await xl.create(path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        for d in self.domains():
            if d.config.uuid == config.uuid:
                assert isinstance(d, XenDomain)
                return d
        raise DriverError(f"xen driver: xl created {config.name} but it is not listed")

    async def capabilities(self) -> HostCaps:
        def read() -> HostCaps:
            info = self.ctrl.physinfo()
            words = self.ctrl.featureset(libxc.FEATURESET_PV_MAX)
            return HostCaps(
                driver=self.name,
                free_memory_bytes=int(info.free_pages) << libxc.PAGE_SHIFT,
                max_vcpus=max(1, int(info.nr_cpus)),
                cpu_features=features.featureset_names(words),
                bridges=bridges(),
            )

        return await asyncio.to_thread(read)

    async def receive_stream(
        self, config: DomainConfig, chunks: AsyncIterator[bytes], *, name: str | None = None
    ) -> XenDomain:
        """Build the domain, paused, from chunks written by ``XenDomain.send_stream`` (PREPARED).

        ``xl restore -p`` does the building, from libxl's JSON config carried
        in ``config.extra`` (or, without it, an xl config made from
        ``config``).  ``name``: what to call it until GO (default: its own).
        """
        name = name or config.name
        # By name only: on one host the source (same uuid) is still here until GO, as with xl migrate.
        if any(d.name == name for d in self.domains()):
            raise DomainExists(f"domain {name} already exists")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        libxl_json = xencfg.libxl_json_for(config, name)
        config_file = None
        if libxl_json is None:
            config_file = self.state_dir / f"{name}.restore.cfg"
            config_file.write_text(xencfg.to_xl_config(config.model_copy(update={"name": name})))
        try:
            receiver = await asyncio.to_thread(
                stream.XlRestoreReceiver, libxl_json, self.state_dir / f"xl-restore-{name}.log", config_file=config_file
            )
        except BaseException:
            if config_file is not None:
                config_file.unlink(missing_ok=True)
            raise
        try:
            async for chunk in chunks:
                await asyncio.to_thread(receiver.feed, chunk)
            await asyncio.to_thread(receiver.finish)
        except BaseException as exc:
            receiver.abort()
            for d in self.domains():
                if d.name == name:
                    await d.destroy()
            if isinstance(exc, OSError):
                raise DriverError(f"xen driver: xl restore failed: {receiver.last_log_line()}") from None
            raise
        finally:
            if config_file is not None:
                config_file.unlink(missing_ok=True)
        for d in self.domains():
            if d.name == name and d.config.uuid == config.uuid:
                assert isinstance(d, XenDomain)
                return d
        raise DriverError(f"xen driver: xl restored {name} but it is not listed")
