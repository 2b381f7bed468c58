"""The sim driver, daemon side: a handle per domain process and the driver that finds them.

Files under ``STATE_DIR/sim/``, per domain: ``<uuid>.json`` (config, name and
pid; rewritten by ``rename``), ``<uuid>.sock`` (the control socket) and
``<uuid>.log`` (the domain process's stderr).  Guest memory and the status
area are memfds received from the process and mapped here, so ``memory()``
and ``dirty_log_fetch()`` never copy guest memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import mmap
import os
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

import relocd
from relocd.drivers import domproc
from relocd.drivers.base import DirtyBitmap, Domain, DomainConfig, DomainState, Driver, HostCaps
from relocd.drivers.sim import hostinfo, invariant
from relocd.drivers.sim import status as status_area
from relocd.drivers.workload import parse_workload
from relocd.errors import ConfigError, DomainExists, DriverError

log = logging.getLogger(__name__)

RECORD_FORMAT = 1
PROCESS_MODULE = "relocd.drivers.sim.process"


class SimDomain(Domain):
    """A sim domain as the daemon sees it: a control connection and two shared mappings."""

    def __init__(
        self,
        driver: SimDriver,
        config: DomainConfig,
        client: domproc.DomainProcessClient,
        pid: int,
        memory: mmap.mmap,
        status: mmap.mmap,
        popen: Any = None,
    ) -> None:
        self.config = config
        self.pid = pid
        self._driver = driver
        self._client = client
        self._memory: mmap.mmap | None = memory
        self._status: mmap.mmap | None = status
        self._popen = popen
        self._run_lock = asyncio.Lock()
        self._last_header = status_area.StatusHeader.read(status)
        self.destroyed = False

    def __repr__(self) -> str:
        return f"<SimDomain {self.name} {self.config.uuid} pid={self.pid}>"

    # ---------------------------------------------------------------- reading shared state

    def _header(self) -> status_area.StatusHeader:
        if self._status is not None and not self._status.closed:
            self._last_header = status_area.StatusHeader.read(self._status)
        return self._last_header

    @property
    def state(self) -> DomainState:
        return DomainState.RUNNING if self._header().running else DomainState.PAUSED

    def memory(self) -> memoryview:
        if self._memory is None or self._memory.closed:
            raise DriverError(f"domain {self.name} is no longer attached")
        return memoryview(self._memory)

    async def stats(self) -> dict[str, Any]:
        h = self._header()
        return {
            "ticks": h.ticks,
            "pages_written": h.pages_written,
            "running": h.running,
            "dirty_logging": h.logging,
            "sweep_pos": h.sweep_pos,
            "workload": self.config.workload,
            "pid": self.pid,
        }

    # ---------------------------------------------------------------- control

    async def _call(self, op: str, **args: Any) -> dict[str, Any]:
        if self.destroyed:
            raise DriverError(f"domain {self.name} has been destroyed")
        reply, fds = await self._client.acall(op, **args)
        for fd in fds:
            os.close(fd)
        return reply

    async def pause(self) -> None:
        async with self._run_lock:
            await self._call("pause")

    async def resume(self) -> None:
        async with self._run_lock:
            await self._call("resume")

    async def destroy(self) -> None:
        await self._driver.destroy_domain(self)

    async def rename(self, new_name: str) -> None:
        await self._driver.rename_domain(self, new_name)

    async def configure(self, config: DomainConfig) -> None:
        previous = self.config
        await super().configure(config)
        if self.config.workload != previous.workload:
            try:
                await self._call("configure", workload=self.config.workload)
            except BaseException:
                self.config = previous
                raise
        await asyncio.to_thread(self._driver._write_record, self.config, self.pid)

    async def dirty_log_start(self) -> None:
        await self._call("dirty_start")

    async def dirty_log_fetch(self) -> DirtyBitmap:
        await self._call("dirty_fetch")
        if self._status is None or self._status.closed:
            raise DriverError(f"domain {self.name} is no longer attached")
        words = status_area.bitmap_words(self.npages)
        # The snapshot is only a bitmap (npages / 8 bytes), copied so the next fetch cannot change it.
        return np.frombuffer(self._status, dtype="<u8", count=words, offset=status_area.BITMAP_OFFSET).astype(
            np.uint64
        )

    async def dirty_log_stop(self) -> None:
        await self._call("dirty_stop")

    async def save_state(self) -> bytes:
        reply = await self._call("save_state")
        return str(reply["blob"]).encode()

    async def load_state(self, blob: bytes) -> None:
        try:
            text = blob.decode()
        except UnicodeDecodeError:
            raise DriverError("state blob was not saved by the sim driver") from None
        await self._call("load_state", blob=text)

    async def check_invariant(self) -> str | None:
        """Verify the guest's pages; a running guest is paused for the check and resumed after."""
        async with self._run_lock:
            was_running = self.state is DomainState.RUNNING
            if was_running:
                await self._call("pause")
            try:
                return await asyncio.to_thread(invariant.check_invariant, self.memory(), self.npages)
            finally:
                if was_running:
                    await self._call("resume")

    # ---------------------------------------------------------------- letting go

    def detach(self) -> None:
        """Drop the connection and mappings; the domain process keeps running."""
        self._header()
        self._client.close()
        for area in (self._memory, self._status):
            if area is not None and not area.closed:
                with contextlib.suppress(BufferError):  # views still out there: the GC unmaps it later
                    area.close()
        self._memory = self._status = None


class SimDriver(Driver):
    """Simulated domains, one process each (see ``process.py``)."""

    name = "sim"

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir)
        self.dir = state_dir / "sim"
        self._domains: dict[str, SimDomain] = {}
        self._claimed: set[str] = set()  # names and uuids of domains being created
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- paths

    def _paths(self, uuid: str) -> tuple[Path, Path, Path]:
        return self.dir / f"{uuid}.json", self.dir / f"{uuid}.sock", self.dir / f"{uuid}.log"

    def _write_record(self, config: DomainConfig, pid: int) -> None:
        record = {"format": RECORD_FORMAT, "config": config.model_dump(mode="json"), "pid": pid}
        path = self._paths(config.uuid)[0]
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, path)

    def _remove_files(self, uuid: str) -> None:
        for path in self._paths(uuid):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    # ---------------------------------------------------------------- Driver

    def domains(self) -> list[Domain]:
        with self._lock:
            return list(self._domains.values())

    async def start(self) -> None:
        await asyncio.to_thread(self._discover)

    async def close(self) -> None:
        with self._lock:
            domains, self._domains = list(self._domains.values()), {}
        for domain in domains:
            domain.detach()

    async def capabilities(self) -> HostCaps:
        return await asyncio.to_thread(hostinfo.host_caps, self.name)

    async def create(self, config: DomainConfig, *, start: bool = True) -> SimDomain:
        if config.driver != self.name:
            raise DriverError(f"domain {config.name} wants driver {config.driver!r}, not {self.name!r}")
        spec = parse_workload(config.workload)
        keys = {config.name, config.uuid}
        with self._lock:
            for d in self._domains.values():
                if d.name == config.name or d.config.uuid == config.uuid:
                    raise DomainExists(f"domain {d.name} ({d.config.uuid}) already exists")
            if keys & self._claimed:
                raise DomainExists(f"domain {config.name} is already being created")
            self._claimed |= keys
        try:
            domain = await asyncio.to_thread(self._create_sync, config, str(spec), start)
        finally:
            with self._lock:
                self._claimed -= keys
        return domain

    def _create_sync(self, config: DomainConfig, workload: str, start: bool) -> SimDomain:
        self.dir.mkdir(parents=True, exist_ok=True)
        record_path, sock_path, log_path = self._paths(config.uuid)
        argv = [
            sys.executable, "-m", PROCESS_MODULE,
            "--socket", str(sock_path),
            "--uuid", config.uuid,
            "--memory-bytes", str(config.memory_bytes),
            "--workload", workload,
        ]  # fmt: skip
        if not start:
            argv.append("--paused")
        package_root = str(Path(relocd.__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        self._write_record(config, 0)
        popen = None
        try:
            popen = domproc.spawn(
                argv,
                socket_path=sock_path,
                log_path=log_path,
                timeout=30.0 + 10.0 * (config.memory_bytes / (1 << 30)),
                env=env,
            )
            self._write_record(config, popen.pid)
            domain = self._attach(config, popen, populate=not start)
        except BaseException:
            if popen is not None:
                domproc.stop_process(popen.pid, marker=config.uuid, popen=popen, grace=0.0)
            self._remove_files(config.uuid)
            raise
        with self._lock:
            self._domains[config.uuid] = domain
        log.info("created sim domain %s (%s), pid %d", config.name, config.uuid, domain.pid)
        return domain

    def _attach(self, config: DomainConfig, popen: Any = None, *, populate: bool = False) -> SimDomain:
        """Connect to a domain process, map its memory and status area."""
        client = domproc.DomainProcessClient(self._paths(config.uuid)[1])
        try:
            reply, fds = client.call("hello")
        except DriverError:
            client.close()
            raise
        try:
            if reply.get("uuid") != config.uuid or reply.get("npages") != config.npages or len(fds) != 2:
                raise DriverError(f"domain process for {config.uuid} answered for someone else: {reply}")
            memory_fd, status_fd = fds
            status_size = status_area.area_size(config.npages)
            if os.fstat(memory_fd).st_size != config.memory_bytes or os.fstat(status_fd).st_size != status_size:
                raise DriverError(f"domain process for {config.uuid} shared memory of the wrong size")
            # An incoming domain's memory is about to be written end to end:
            # map every page now (the reservation) rather than fault them in
            # one by one inside the receive path.
            flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
            memory = mmap.mmap(memory_fd, config.memory_bytes, flags, mmap.PROT_READ | mmap.PROT_WRITE)
            status = mmap.mmap(status_fd, status_size, mmap.MAP_SHARED, mmap.PROT_READ)
        except BaseException:
            client.close()
            raise
        finally:
            for fd in fds:
                os.close(fd)
        return SimDomain(self, config, client, int(reply["pid"]), memory, status, popen)

    def _discover(self) -> None:
        """Reattach to every domain process still running; clean up after the dead ones."""
        if not self.dir.is_dir():
            return
        for record_path in sorted(self.dir.glob("*.json")):
            uuid = record_path.stem
            with self._lock:
                if uuid in self._domains:
                    continue
            try:
                record = json.loads(record_path.read_text())
                config = DomainConfig.model_validate(record["config"])
                pid = int(record.get("pid", 0))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring unreadable domain record %s: %s", record_path, exc)
                continue
            try:
                domain = self._attach(config)
            except DriverError as exc:
                if domproc.process_alive(pid, uuid):
                    log.warning("sim domain %s (pid %d) is alive but does not answer: %s", config.name, pid, exc)
                else:
                    log.info("sim domain %s is gone; removing its files", config.name)
                    self._remove_files(uuid)
                continue
            with self._lock:
                self._domains[uuid] = domain
            log.info("found sim domain %s (%s), pid %d", config.name, uuid, domain.pid)
        self._remove_orphan_sockets()

    def _remove_orphan_sockets(self) -> None:
        for sock_path in self.dir.glob("*.sock"):
            if sock_path.with_suffix(".json").exists():
                continue
            client = domproc.DomainProcessClient(sock_path, timeout=1.0)
            try:
                client.connect()
            except DriverError:
                with contextlib.suppress(FileNotFoundError):
                    sock_path.unlink()
            finally:
                client.close()

    # ---------------------------------------------------------------- per-domain operations

    async def destroy_domain(self, domain: SimDomain) -> None:
        if domain.destroyed:
            return
        domain.destroyed = True
        await asyncio.to_thread(self._destroy_sync, domain)

    def _destroy_sync(self, domain: SimDomain) -> None:
        with contextlib.suppress(DriverError):
            reply, fds = domain._client.call("shutdown", timeout=5.0)
            for fd in fds:
                os.close(fd)
        domain.detach()
        domproc.stop_process(domain.pid, marker=domain.config.uuid, popen=domain._popen, grace=5.0)
        self._remove_files(domain.config.uuid)
        with self._lock:
            if self._domains.get(domain.config.uuid) is domain:
                del self._domains[domain.config.uuid]
        log.info("destroyed sim domain %s (%s)", domain.name, domain.config.uuid)

    async def rename_domain(self, domain: SimDomain, new_name: str) -> None:
        if domain.destroyed:
            raise DriverError(f"domain {domain.name} has been destroyed")
        try:
            config = DomainConfig.model_validate({**domain.config.model_dump(), "name": new_name})
        except ValidationError:
            raise ConfigError(f"bad domain name {new_name!r}") from None
        with self._lock:
            for other in self._domains.values():
                if other is not domain and other.name == new_name:
                    raise DomainExists(f"domain {new_name} already exists")
            if new_name in self._claimed:
                raise DomainExists(f"domain {new_name} is being created")
        await asyncio.to_thread(self._write_record, config, domain.pid)
        domain.config = config
