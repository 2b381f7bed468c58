"""A domain run as its own OS process (``sim``, ``kvm``), as the daemon sees it.

Split from ``procdriver.py``, which finds, starts and stops these
processes: ``ProcessDomain`` is the handle on one of them (its control
connection, both shared mappings, the population of incoming memory),
``ProcessLink`` what attaching to one yields.  Requests wait for a process
built paused to answer ``hello`` before they go out (``_until_started``).
"""


from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import contextlib
import mmap
import threading
import os
import subprocess
import time
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import numpy as np

from relocd.drivers import domproc
from relocd.drivers.base import DirtyBitmap, Domain, DomainConfig, DomainState
from relocd.drivers.populate import Populator
from relocd.errors import DriverError

if TYPE_CHECKING:
    from relocd.drivers.procdriver import ProcessDriver



class ProcessLink(NamedTuple):
    """A domain process just attached to: its connection, its ``hello`` answer and both mappings."""

    client: domproc.DomainProcessClient
    hello: dict[str, Any]
    memory: mmap.mmap
    shared: mmap.mmap


class ProcessDomain(Domain):
    """A domain process as the daemon sees it: a control connection and two shared mappings."""

    #: where the dirty-bitmap snapshot starts in the second shared area
    bitmap_offset: ClassVar[int] = 0

    def __init__(
        self,
        driver: ProcessDriver[Any],
        config: DomainConfig,
        client: domproc.DomainProcessClient,
        pid: int,
        memory: mmap.mmap,
        shared: mmap.mmap,
        popen: subprocess.Popen[bytes] | None = None,
    ) -> None:
        self.config = config
        self.pid = pid
        self._driver = driver
        self._client = client
        self._memory: mmap.mmap | None = memory
        #: the second memfd the process shares (sim: status area, kvm: dirty bitmap)
        self._shared: mmap.mmap | None = shared
        self._popen = popen
        self._run_lock = asyncio.Lock()
        self.destroyed = False
        #: populates an incoming domain's memory in the background (see populate.py); None once settled
        self._populator: Populator | None = None
        #: a domain built paused: its process is still coming up (resolved by a thread); None once it answered
        self._starting: concurrent.futures.Future[None] | None = None
        #: a workload adopted (configure) before the process could be told, and the task that tells it
        self._pending_workload: str | None = None
        self._settling: asyncio.Future[None] | None = None
        self._starting_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.config.uuid} pid={self.pid}>"

    def _attached(self, area: mmap.mmap | None) -> mmap.mmap:
        if area is None or area.closed:
            raise DriverError(f"domain {self.name} is no longer attached")
        return area

    def memory(self) -> memoryview:
        return memoryview(self._attached(self._memory))

    def _settle_memory(self) -> None:
        """Every page of guest memory exists now, or DriverError (in a worker thread)."""
        populator = self._populator
        if populator is None:
            return
        populator.finish(f"memory of domain {self.name}")
        self._populator = None
        spent = (populator.done_at or time.monotonic()) - populator.started_at
        self._driver._log.debug(
            "domain %s: memory populated in the background (%d chunks, %d reached by the stream first, %.3f s)",
            self.name, populator.populated, populator.skipped, spent,
        )  # fmt: skip

    async def memory_set_aside(self) -> None:
        """Wait until guest memory is really there (an incoming domain's is populated in the background).

        Called before the vCPU state loads, so a target that cannot have the
        memory it reserved fails before it says PREPARED.
        """
        if self._populator is not None:
            await asyncio.to_thread(self._settle_memory)

    async def load_state(self, blob: bytes) -> None:
        await self.memory_set_aside()
        await self._load_state(blob)

    @abc.abstractmethod
    async def _load_state(self, blob: bytes) -> None:
        """Hand the vCPU state to the domain process (guest memory is all there by now)."""

    # ---------------------------------------------------------------- control

    async def _call(self, op: str, **args: Any) -> dict[str, Any]:
        if self.destroyed:
            raise DriverError(f"domain {self.name} has been destroyed")
        if self._starting is not None:
            await self._until_started()
        return await self._request(op, **args)

    async def _request(self, op: str, **args: Any) -> dict[str, Any]:
        reply, fds = await self._client.acall(op, **args)
        for fd in fds:
            os.close(fd)
        return reply

    @property
    def started(self) -> bool:
        """Has the domain process answered (a domain built paused comes up in the background)?"""
        return self._starting is None or (self._starting.done() and self._starting.exception() is None)

    async def _until_started(self) -> None:
        """Wait for a domain built paused to answer, then tell it what it missed; DriverError if it never did."""
        async with self._starting_lock:
            starting = self._starting
            if starting is None:
                return
            await asyncio.wrap_future(starting)  # the process's own failure, as DriverError
            while (workload := self._pending_workload) is not None:
                await self._request("configure", workload=workload)
                if self._pending_workload == workload:
                    self._pending_workload = None
            self._starting = None

    def _ran(self, running: bool) -> None:
        """Called after a pause or resume the process acknowledged (for drivers that track it here)."""

    async def pause(self) -> None:
        async with self._run_lock:
            await self._call("pause")
            self._ran(False)

    async def resume(self) -> None:
        async with self._run_lock:
            await self._call("resume")
            self._ran(True)

    throttles = True

    async def throttle(self, fraction: float) -> None:
        if not 0.0 <= fraction < 1.0:
            raise DriverError(f"throttle {fraction!r}: a fraction from 0 up to 1")
        await self._call("throttle", fraction=fraction)

    async def destroy(self) -> None:
        await self._driver.destroy_domain(self)

    async def discard(self) -> None:
        await self._driver.destroy_domain(self, background=True)

    async def rename(self, new_name: str) -> None:
        await self._driver.rename_domain(self, new_name)

    async def configure(self, config: DomainConfig) -> None:
        previous = self.config
        await super().configure(config)
        if self.config.workload != previous.workload:
            if self._starting is not None:
                # Still coming up (an incoming domain, right after RESERVE):
                # it learns the workload as soon as it answers, so the stream
                # need not wait for it (nor, live, the downtime's load_state).
                self._pending_workload = self.config.workload
                if self._settling is None:
                    self._settling = asyncio.ensure_future(self._until_started())
                    self._settling.add_done_callback(_quietly)
            else:
                try:
                    await self._call("configure", workload=self.config.workload)
                except BaseException:
                    self.config = previous
                    raise
        await asyncio.to_thread(self._driver._write_record, self.config, self.pid)

    async def dirty_log_start(self) -> None:
        await self._call("dirty_start")

    def _fetched(self, reply: dict[str, Any]) -> None:
        """Called with the process's answer to a dirty-log fetch (for drivers that keep its figures)."""

    async def dirty_log_fetch(self) -> DirtyBitmap:
        self._fetched(await self._call("dirty_fetch"))
        area = self._attached(self._shared)
        words = (self.npages + 63) // 64
        # Only the bitmap (npages / 8 bytes) is copied, so the next fetch cannot change it under the caller.
        return np.frombuffer(area, dtype="<u8", count=words, offset=self.bitmap_offset).astype(np.uint64)

    async def dirty_log_stop(self) -> None:
        await self._call("dirty_stop")

    @abc.abstractmethod
    def _invariant_problem(self, memory: memoryview) -> str | None:
        """The guest's own page check over paused memory (runs in a worker thread)."""

    async def check_invariant(self) -> str | None:
        """Verify the guest's pages; a running guest is paused for the check and resumed after."""
        async with self._run_lock:
            was_running = self.state is DomainState.RUNNING
            if was_running:
                await self._call("pause")
            try:
                return await asyncio.to_thread(self._invariant_problem, self.memory())
            finally:
                if was_running:
                    await self._call("resume")

    # ---------------------------------------------------------------- letting go

    def detach(self, *, unmap_later: bool = False) -> None:
        """Drop the connection and mappings; the domain process keeps running.

        ``unmap_later``: unmap in a background thread.  For a domain whose
        process is gone, our mapping holds the last reference to its memory,
        so closing it frees every page: 0.2-0.25 s per GiB here, which need
        not hold up a migration's end or a destroy.
        """
        if self._populator is not None:
            self._populator.stop()  # it holds guest memory mapped
            self._populator = None
        self._client.close()
        areas = [a for a in (self._memory, self._shared) if a is not None and not a.closed]
        self._memory = self._shared = None
        if unmap_later:
            threading.Thread(target=_unmap, args=(areas,), name="unmap", daemon=True).start()
        else:
            _unmap(areas)


def _quietly(task: asyncio.Future[None]) -> None:
    """A background ``_until_started`` failed: the next request raises the same error, nothing to log twice."""
    if not task.cancelled():
        task.exception()


def _unmap(areas: list[mmap.mmap]) -> None:
    for area in areas:
        with contextlib.suppress(BufferError):  # views still out there: the GC unmaps it later
            area.close()
