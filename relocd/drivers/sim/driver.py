"""The sim driver, daemon side: a handle per domain process and the driver that finds them.

Files under ``STATE_DIR/sim/`` as for every process-based driver (see
procdriver.py).  The second shared memfd is the status area (status.py):
the guest's progress counters, then its dirty-bitmap snapshot.
"""

from __future__ import annotations

import asyncio
import mmap
import subprocess
import time
from typing import Any

from relocd.drivers import domproc
from relocd.drivers.base import DomainConfig, DomainState, HostCaps
from relocd.drivers.procdomain import ProcessDomain, ProcessLink
from relocd.drivers.procdriver import RECORD_FORMAT, ProcessDriver
from relocd.drivers.sim import hostinfo, invariant
from relocd.drivers.sim import status as status_area
from relocd.errors import DriverError

__all__ = ["PROCESS_MODULE", "RECORD_FORMAT", "SimDomain", "SimDriver"]

PROCESS_MODULE = "relocd.drivers.sim.process"
#: how long a just-attached domain's status header may take to appear
ATTACH_WAIT_S = 2.0


class SimDomain(ProcessDomain):
    """A sim domain as the daemon sees it: a control connection, guest memory and the status area."""

    bitmap_offset = status_area.BITMAP_OFFSET

    def __init__(
        self,
        driver: SimDriver,
        config: DomainConfig,
        client: domproc.DomainProcessClient,
        pid: int,
        memory: mmap.mmap,
        status: mmap.mmap,
        popen: subprocess.Popen[bytes] | None = None,
    ) -> None:
        super().__init__(driver, config, client, pid, memory, status, popen)
        self._last_header = self._read_header(status, wait_s=ATTACH_WAIT_S)

    def _read_header(self, area: mmap.mmap, wait_s: float = 0.0) -> status_area.StatusHeader:
        """The status header; a domain process publishes it before it serves, so a bad one is an error.

        Seen once in CI, under load, at attach: an all-zero header from a
        process that had answered ``hello`` (not understood yet).  At attach
        the header gets ``wait_s`` to appear; after that, or later in the
        domain's life, a bad header is a DriverError naming the domain, not
        an internal error.
        """
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return status_area.StatusHeader.read(area)
            except ValueError as exc:
                if time.monotonic() >= deadline:
                    raise DriverError(f"sim domain {self.config.name}: unreadable status area ({exc})") from None
            time.sleep(0.01)

    def _header(self) -> status_area.StatusHeader:
        """The guest's counters, or the last ones read once the status area is unmapped."""
        if self._shared is not None and not self._shared.closed:
            self._last_header = self._read_header(self._shared)
        return self._last_header

    @property
    def state(self) -> DomainState:
        return DomainState.RUNNING if self._header().running else DomainState.PAUSED

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

    async def save_state(self) -> bytes:
        reply = await self._call("save_state")
        return str(reply["blob"]).encode()

    async def _load_state(self, blob: bytes) -> None:
        try:
            text = blob.decode()
        except UnicodeDecodeError:
            raise DriverError("state blob was not saved by the sim driver") from None
        await self._call("load_state", blob=text)

    def _invariant_problem(self, memory: memoryview) -> str | None:
        return invariant.check_invariant(memory, self.npages)

    def detach(self, *, unmap_later: bool = False) -> None:
        self._header()  # keep the last counters for state and stats
        super().detach(unmap_later=unmap_later)


class SimDriver(ProcessDriver[SimDomain]):
    """Simulated domains, one process each (see ``process.py``)."""

    name = "sim"
    process_module = PROCESS_MODULE

    async def capabilities(self) -> HostCaps:
        return await asyncio.to_thread(hostinfo.host_caps, self.name)

    def _process_options(self, config: DomainConfig) -> list[str]:
        return []

    def _shared_bytes(self, npages: int) -> int:
        return status_area.area_size(npages)

    def _init_shared(self, area: mmap.mmap, config: DomainConfig) -> None:
        # what the guest publishes when it starts paused: state reads it meanwhile
        status_area.StatusHeader(
            ticks=0, pages_written=0, running=False, logging=False, sweep_pos=0, npages=config.npages
        ).write(area)

    def _domain(self, config: DomainConfig, link: ProcessLink, popen: subprocess.Popen[bytes] | None) -> SimDomain:
        pid = int(link.hello["pid"])
        return SimDomain(self, config, link.client, pid, link.memory, link.shared, popen)

    def _discover(self) -> None:
        super()._discover()
        self._remove_orphan_sockets()
