"""The kvm driver, daemon side: a handle per micro-VMM process and the driver that finds them.

Files under ``STATE_DIR/kvm/``, per domain: ``<uuid>.json`` (config and pid;
rewritten by ``rename``), ``<uuid>.sock`` (the VMM's control socket) and
``<uuid>.log`` (its stderr).  Guest memory and the dirty bitmap are memfds
received from the VMM and mapped here: ``memory()`` is the guest's RAM
itself, and a dirty-log fetch copies only the bitmap (32 KiB per GiB).
"""

from __future__ import annotations

import asyncio
import base64
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
from relocd.drivers.base import (
    DirtyBitmap,
    Domain,
    DomainConfig,
    DomainState,
    Driver,
    HostCaps,
)
from relocd.drivers.hostinfo import bridges, mem_available
from relocd.drivers.kvm import cpufeatures, layout
from relocd.drivers.kvm.vm import KVM_DEVICE, KvmSystem
from relocd.drivers.kvm.vmm import DEFAULT_DIRTY_MODE, DIRTY_MODES, bitmap_bytes
from relocd.drivers.workload import parse_workload
from relocd.errors import ConfigError, DomainExists, DriverError

log = logging.getLogger(__name__)

RECORD_FORMAT = 1
VMM_MODULE = "relocd.drivers.kvm.vmm"


def kvm_usable(path: str = KVM_DEVICE) -> str | None:
    """None if /dev/kvm can be opened and speaks API 12, else why not (one line)."""
    try:
        KvmSystem(path).close()
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    return None


class KvmDomain(Domain):
    """A KVM domain as the daemon sees it: a control connection and two shared mappings."""

    def __init__(self, driver: KvmDriver, config: DomainConfig, client: domproc.DomainProcessClient,
                 pid: int, running: bool, memory: mmap.mmap, bitmap: mmap.mmap, popen: Any = None) -> None:
        self.config = config
        self.pid = pid
        self._driver = driver
        self._client = client
        self._running = running
        self._memory: mmap.mmap | None = memory
        self._bitmap: mmap.mmap | None = bitmap
        self._popen = popen
        self._run_lock = asyncio.Lock()
        self.destroyed = False
        self.last_fetch_us = 0.0

    def __repr__(self) -> str:
        return f"<KvmDomain {self.name} {self.config.uuid} pid={self.pid}>"

    @property
    def state(self) -> DomainState:
        return DomainState.RUNNING if self._running else DomainState.PAUSED

    def memory(self) -> memoryview:
        if self._memory is None or self._memory.closed:
            raise DriverError(f"domain {self.name} is no longer attached")
        return memoryview(self._memory)

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
            self._running = False

    async def resume(self) -> None:
        async with self._run_lock:
            await self._call("resume")
            self._running = True

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
        reply = await self._call("dirty_fetch")
        self.last_fetch_us = float(reply.get("fetch_us", 0.0))
        if self._bitmap is None or self._bitmap.closed:
            raise DriverError(f"domain {self.name} is no longer attached")
        words = (self.npages + 63) // 64
        # KVM's own bitmap, copied so the next fetch cannot change it under the caller
        return np.frombuffer(self._bitmap, dtype="<u8", count=words).astype(np.uint64)

    async def dirty_log_stop(self) -> None:
        await self._call("dirty_stop")

    async def save_state(self) -> bytes:
        reply = await self._call("save_state")
        return base64.b64decode(str(reply["blob"]))  # state.py's binary format, magic first

    async def load_state(self, blob: bytes) -> None:
        await self._call("load_state", blob=base64.b64encode(blob).decode("ascii"))

    async def stats(self) -> dict[str, Any]:
        """The guest's own counters (read from its control page) and the VMM's."""
        vmm = await self._call("stats")
        self._running = bool(vmm.get("running"))
        ctl = layout.read_ctl(self.memory())
        return {
            "ticks": ctl["ticks"],
            "pages_written": ctl["written"],
            "sweep_pos": ctl["cursor"],
            "running": self._running,
            "crashed": vmm.get("crashed"),
            "dirty_logging": vmm.get("logging"),
            "dirty_mode": vmm.get("dirty_mode"),
            "vmm_exits": vmm.get("exits"),
            "vmm_batches": vmm.get("batches"),
            "vmm_pages": vmm.get("pages"),
            "workload": self.config.workload,
            "pid": self.pid,
        }

    async def check_invariant(self) -> str | None:
        """Verify the guest's pages; a running guest is paused for the check and resumed after."""
        async with self._run_lock:
            was_running = self._running
            if was_running:
                await self._call("pause")
            try:
                return await asyncio.to_thread(layout.check_invariant, self.memory())
            finally:
                if was_running:
                    await self._call("resume")

    def detach(self) -> None:
        """Drop the connection and mappings; the VMM keeps running."""
        self._client.close()
        for area in (self._memory, self._bitmap):
            if area is not None and not area.closed:
                with contextlib.suppress(BufferError):  # views still out there: the GC unmaps later
                    area.close()
        self._memory = self._bitmap = None


class KvmDriver(Driver):
    """Real KVM virtual machines, one micro-VMM process each (see ``vmm.py``)."""

    name = "kvm"

    def __init__(self, state_dir: Path, *, dirty_mode: str = DEFAULT_DIRTY_MODE) -> None:
        super().__init__(state_dir)
        if dirty_mode not in DIRTY_MODES:
            raise ConfigError(f"kvm dirty log mode must be one of {', '.join(DIRTY_MODES)}")
        self.dir = state_dir / "kvm"
        self.dirty_mode = dirty_mode
        self._domains: dict[str, KvmDomain] = {}
        self._claimed: set[str] = set()
        self._lock = threading.Lock()

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
        return await asyncio.to_thread(self._capabilities)

    def _capabilities(self) -> HostCaps:
        try:
            system = KvmSystem()
        except OSError as exc:
            raise DriverError(f"kvm unavailable: {KVM_DEVICE}: {exc.strerror or exc}") from None
        try:
            max_vcpus = system.max_vcpus()
            features = cpufeatures.feature_names(cpufeatures.entries_of(system.supported_cpuid()))
        finally:
            system.close()
        return HostCaps(driver=self.name, free_memory_bytes=mem_available(), max_vcpus=max_vcpus,
                        cpu_features=features, bridges=bridges())

    async def create(self, config: DomainConfig, *, start: bool = True) -> Domain:
        if config.driver != self.name:
            raise DriverError(f"domain {config.name} wants driver {config.driver!r}, not {self.name!r}")
        spec = parse_workload(config.workload)
        try:
            layout.GuestLayout.for_pages(config.npages)
        except ValueError as exc:
            raise DriverError(f"domain {config.name}: {exc}") from None
        keys = {config.name, config.uuid}
        with self._lock:
            for d in self._domains.values():
                if d.name == config.name or d.config.uuid == config.uuid:
                    raise DomainExists(f"domain {d.name} ({d.config.uuid}) already exists")
            if keys & self._claimed:
                raise DomainExists(f"domain {config.name} is already being created")
            self._claimed |= keys
        try:
            return await asyncio.to_thread(self._create_sync, config, str(spec), start)
        finally:
            with self._lock:
                self._claimed -= keys

    def _create_sync(self, config: DomainConfig, workload: str, start: bool) -> KvmDomain:
        problem = kvm_usable()
        if problem:
            raise DriverError(f"kvm unavailable: {problem}")
        self.dir.mkdir(parents=True, exist_ok=True)
        _, sock_path, log_path = self._paths(config.uuid)
        argv = [
            sys.executable, "-m", VMM_MODULE,
            "--socket", str(sock_path),
            "--uuid", config.uuid,
            "--memory-bytes", str(config.memory_bytes),
            "--vcpus", str(config.vcpus),
            "--workload", workload,
            "--dirty-mode", self.dirty_mode,
        ]  # fmt: skip
        if not start:
            argv.append("--paused")
        package_root = str(Path(relocd.__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        self._write_record(config, 0)
        popen = None
        try:
            popen = domproc.spawn(argv, socket_path=sock_path, log_path=log_path,
                                  timeout=30.0 + 10.0 * (config.memory_bytes / (1 << 30)), env=env)
            self._write_record(config, popen.pid)
            domain = self._attach(config, popen, populate=not start)
        except BaseException:
            if popen is not None:
                domproc.stop_process(popen.pid, marker=config.uuid, popen=popen, grace=0.0)
            self._remove_files(config.uuid)
            raise
        with self._lock:
            self._domains[config.uuid] = domain
        log.info("created kvm domain %s (%s), pid %d", config.name, config.uuid, domain.pid)
        return domain

    def _attach(self, config: DomainConfig, popen: Any = None, *, populate: bool = False) -> KvmDomain:
        """Connect to a VMM, map guest memory and the dirty bitmap it shares."""
        client = domproc.DomainProcessClient(self._paths(config.uuid)[1])
        try:
            reply, fds = client.call("hello")
        except DriverError:
            client.close()
            raise
        try:
            if (reply.get("driver") != "kvm" or reply.get("uuid") != config.uuid
                    or reply.get("npages") != config.npages or len(fds) != 2):
                raise DriverError(f"VMM for {config.uuid} answered for someone else: {reply}")
            memory_fd, bitmap_fd = fds
            size = bitmap_bytes(config.npages)
            if os.fstat(memory_fd).st_size != config.memory_bytes or os.fstat(bitmap_fd).st_size != size:
                raise DriverError(f"VMM for {config.uuid} shared memory of the wrong size")
            # An incoming VM's memory is about to be written end to end: map
            # every page now rather than fault them in inside the receive path.
            flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
            memory = mmap.mmap(memory_fd, config.memory_bytes, flags, mmap.PROT_READ | mmap.PROT_WRITE)
            bitmap = mmap.mmap(bitmap_fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        except BaseException:
            client.close()
            raise
        finally:
            for fd in fds:
                os.close(fd)
        return KvmDomain(self, config, client, int(reply["pid"]), bool(reply.get("running")),
                         memory, bitmap, popen)

    def _discover(self) -> None:
        """Reattach to every VMM still running; clean up after the dead ones."""
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
                    log.warning("kvm domain %s (pid %d) is alive but does not answer: %s", config.name, pid, exc)
                else:
                    log.info("kvm domain %s is gone; removing its files", config.name)
                    self._remove_files(uuid)
                continue
            with self._lock:
                self._domains[uuid] = domain
            log.info("found kvm domain %s (%s), pid %d", config.name, uuid, domain.pid)

    # ---------------------------------------------------------------- per-domain operations

    async def destroy_domain(self, domain: KvmDomain) -> None:
        if domain.destroyed:
            return
        domain.destroyed = True
        await asyncio.to_thread(self._destroy_sync, domain)

    def _destroy_sync(self, domain: KvmDomain) -> None:
        with contextlib.suppress(DriverError):
            _, fds = domain._client.call("shutdown", timeout=5.0)
            for fd in fds:
                os.close(fd)
        domain.detach()
        domproc.stop_process(domain.pid, marker=domain.config.uuid, popen=domain._popen, grace=5.0)
        self._remove_files(domain.config.uuid)
        with self._lock:
            if self._domains.get(domain.config.uuid) is domain:
                del self._domains[domain.config.uuid]
        log.info("destroyed kvm domain %s (%s)", domain.name, domain.config.uuid)

    async def rename_domain(self, domain: KvmDomain, new_name: str) -> None:
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



