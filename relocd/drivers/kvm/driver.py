"""The kvm driver, daemon side: a handle per micro-VMM process and the driver that finds them.

Files under ``STATE_DIR/kvm/`` as for every process-based driver (see
procdriver.py).  The second shared memfd is KVM's dirty bitmap itself, so a
dirty-log fetch copies only the bitmap (32 KiB per GiB).
"""

from __future__ import annotations

import asyncio
import base64
import mmap
import subprocess
from pathlib import Path
from typing import Any

from relocd.drivers import domproc
from relocd.drivers.base import DomainConfig, DomainState, HostCaps
from relocd.drivers.hostinfo import bridges, mem_available
from relocd.drivers.kvm import cpufeatures, layout
from relocd.drivers.kvm.vm import KVM_DEVICE, KvmSystem
from relocd.drivers.kvm.vmm import DEFAULT_DIRTY_MODE, DIRTY_MODES, bitmap_bytes
from relocd.drivers.procdomain import ProcessDomain, ProcessLink
from relocd.drivers.procdriver import RECORD_FORMAT, ProcessDriver
from relocd.errors import ConfigError, DriverError

__all__ = ["RECORD_FORMAT", "VMM_MODULE", "KvmDomain", "KvmDriver", "kvm_usable"]

VMM_MODULE = "relocd.drivers.kvm.vmm"


def kvm_usable(path: str = KVM_DEVICE) -> str | None:
    """None if /dev/kvm can be opened and speaks API 12, else why not (one line)."""
    try:
        KvmSystem(path).close()
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    return None


class KvmDomain(ProcessDomain):
    """A KVM domain as the daemon sees it: a control connection, guest memory and KVM's dirty bitmap."""

    def __init__(
        self,
        driver: KvmDriver,
        config: DomainConfig,
        client: domproc.DomainProcessClient,
        pid: int,
        running: bool,
        memory: mmap.mmap,
        bitmap: mmap.mmap,
        popen: subprocess.Popen[bytes] | None = None,
    ) -> None:
        super().__init__(driver, config, client, pid, memory, bitmap, popen)
        self._running = running
        self.last_fetch_us = 0.0

    @property
    def state(self) -> DomainState:
        return DomainState.RUNNING if self._running else DomainState.PAUSED

    def _ran(self, running: bool) -> None:
        self._running = running

    def _fetched(self, reply: dict[str, Any]) -> None:
        self.last_fetch_us = float(reply.get("fetch_us", 0.0))

    async def save_state(self) -> bytes:
        reply = await self._call("save_state")
        return base64.b64decode(str(reply["blob"]))  # state.py's binary format, magic first

    async def _load_state(self, blob: bytes) -> None:
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

    def _invariant_problem(self, memory: memoryview) -> str | None:
        return layout.check_invariant(memory)


class KvmDriver(ProcessDriver[KvmDomain]):
    """Real KVM virtual machines, one micro-VMM process each (see ``vmm.py``)."""

    name = "kvm"
    process_module = VMM_MODULE
    process_noun = "VMM"

    def __init__(
        self, state_dir: Path, *, dirty_mode: str = DEFAULT_DIRTY_MODE, memory_dir: Path | None = None
    ) -> None:
        super().__init__(state_dir, memory_dir=memory_dir)
        if dirty_mode not in DIRTY_MODES:
            raise ConfigError(f"kvm dirty log mode must be one of {', '.join(DIRTY_MODES)}")
        self.dirty_mode = dirty_mode

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

    def _check_config(self, config: DomainConfig) -> None:
        try:
            layout.GuestLayout.for_pages(config.npages)
        except ValueError as exc:
            raise DriverError(f"domain {config.name}: {exc}") from None

    def _check_host(self) -> None:
        problem = kvm_usable()
        if problem:
            raise DriverError(f"kvm unavailable: {problem}")

    def _process_options(self, config: DomainConfig) -> list[str]:
        return ["--vcpus", str(config.vcpus), "--dirty-mode", self.dirty_mode]

    def _shared_bytes(self, npages: int) -> int:
        return bitmap_bytes(npages)

    def _domain(self, config: DomainConfig, link: ProcessLink, popen: subprocess.Popen[bytes] | None) -> KvmDomain:
        pid = int(link.hello["pid"])
        running = bool(link.hello.get("running"))
        return KvmDomain(self, config, link.client, pid, running, link.memory, link.shared, popen)
