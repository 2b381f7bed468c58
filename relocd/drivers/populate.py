"""Populating guest memory in the background, so the reservation does not pay for it.

An incoming domain's memory is a fresh memfd: no page exists yet.  Every
page costs the kernel an allocation, a zeroing and a page-table entry in each
mapping that touches it, and on a virtual machine whose host hands memory out
lazily the first touch of a page costs microseconds (measured here: 2-3 s for
1 GiB, done in one thread).  Doing that serially at RESERVE made the
reservation most of a non-live move; see docs/memory.md for the figures.

``Populator`` does it in worker threads instead, from the moment the domain
is built, in ascending chunks -- the order the first round of a migration
lands pages in -- with ``madvise(MADV_POPULATE_WRITE)`` on the daemon's own
mapping (allocates, zeroes and maps writable, never changes what a page
holds, so racing the receive that writes the same pages is harmless).  A
chunk the stream has already reached (its last page resident, asked with
``mincore``) is skipped, so the workers run ahead of the receive cursor
instead of behind it.  The receive never waits for them: where it gets to a
page first, the kernel populates it on the write fault, as before.

``finish`` is the reservation's promise made physical: it stops the workers
and checks that every page of guest memory exists, populating the few that
do not (pages the stream never wrote), and raises DriverError when the
memory cannot be had -- which the engine sees before it says PREPARED, so
the source still holds the only running copy and rolls back as for any other
target failure.  What is set aside before that is the daemon's reservation
ledger (MemAvailable less every reservation held, checked at RESERVE).

``MADV_POPULATE_WRITE``/``READ`` need Linux 5.14; older kernels get the
fallback, a read of one byte per page (allocates and maps the page without
changing it; a later write may still take a cheap fault).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import mmap
import os
import threading
import time
from collections.abc import Callable

import numpy as np

from relocd.errors import DriverError

log = logging.getLogger(__name__)

PAGE = mmap.PAGESIZE
MADV_POPULATE_READ = 22
MADV_POPULATE_WRITE = 23
#: work handed to a worker at a time; small enough that stopping one waits a few ms
CHUNK_BYTES = 4 << 20
#: workers for an incoming domain: 2 measured best on this project's 2-core machines
#: (docs/memory.md); up to 4 where there are more cores (not measured)
WRITE_THREADS = min(4, max(2, os.cpu_count() or 2))
#: their niceness: they take the CPU the receive and the event loop leave (the
#: receive populates what it reaches first anyway); at 0 they slowed RESERVED
#: down on 2 busy cores (docs/memory.md)
WRITE_NICE = 5

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.mincore.restype = ctypes.c_int

#: set once a kernel says it lacks MADV_POPULATE_* (EINVAL): every later chunk uses the fallback
_no_populate_advice = False


def madvise(addr: int, length: int, advice: int) -> None:
    """``madvise(2)`` (ctypes releases the GIL for the call); OSError on failure."""
    if _libc.madvise(addr, length, advice) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _address(area: mmap.mmap) -> tuple[ctypes.c_char, int]:
    """An anchor that keeps ``area`` from being closed (unmapped) while held, and its address."""
    anchor = ctypes.c_char.from_buffer(area)
    return anchor, ctypes.addressof(anchor)


def resident(area: mmap.mmap, offset: int = 0, length: int | None = None) -> np.ndarray:
    """Per page of ``area[offset:offset+length]``: is it in memory (``mincore``; page-aligned offset)."""
    if length is None:
        length = len(area) - offset
    npages = (length + PAGE - 1) // PAGE
    vec = np.zeros(npages, dtype=np.uint8)
    if npages == 0:
        return vec.astype(bool)
    anchor, base = _address(area)
    try:
        if _libc.mincore(base + offset, length, vec.ctypes.data) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        del anchor
    return (vec & 1).astype(bool)


def _touch(area: mmap.mmap, offset: int, length: int) -> None:
    """The fallback: read one byte of every page (allocates and maps it, changes nothing)."""
    view = np.frombuffer(area, dtype=np.uint8, count=length, offset=offset)
    int(view[::PAGE].max())


def populate_range(area: mmap.mmap, base: int, offset: int, length: int, *, write: bool = True) -> None:
    """Populate ``area[offset:offset+length]`` (``base`` is its address); OSError if it cannot."""
    global _no_populate_advice
    if not _no_populate_advice:
        try:
            madvise(base + offset, length, MADV_POPULATE_WRITE if write else MADV_POPULATE_READ)
            return
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            _no_populate_advice = True
            log.info("this kernel lacks MADV_POPULATE_*; populating guest memory by reading each page")
    _touch(area, offset, length)


class Populator:
    """Worker threads that populate one mapping, chunk by chunk, lowest addresses first.

    The mapping must stay open until ``finish`` or ``stop`` returned (the
    populator holds an export on it, so ``close`` raises BufferError before).
    """

    def __init__(
        self,
        area: mmap.mmap,
        *,
        threads: int = WRITE_THREADS,
        write: bool = True,
        chunk_bytes: int = CHUNK_BYTES,
        name: str = "populate",
        nice: int = 0,
    ) -> None:
        if chunk_bytes <= 0 or chunk_bytes % PAGE:
            raise ValueError(f"chunk size {chunk_bytes} is not a positive multiple of {PAGE}")
        self.area = area
        self.size = len(area)
        self.write = write
        self.chunk_bytes = chunk_bytes
        self.nchunks = (self.size + chunk_bytes - 1) // chunk_bytes
        self.nice = nice
        self._anchor: ctypes.c_char | None
        self._anchor, self._base = _address(area)
        self._lock = threading.Lock()
        self._next = 0
        self._stop = threading.Event()
        self.error: OSError | None = None
        #: chunks populated and chunks skipped because the stream got there first
        self.populated = 0
        self.skipped = 0
        self._skipped_chunks: list[int] = []
        self.started_at = time.monotonic()
        self.done_at: float | None = None
        self._running = max(1, threads)
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(max(1, threads))
        ]
        #: for tests: called with each chunk's offset before it is populated
        self.before_chunk: Callable[[int], None] | None = None

    def start(self) -> Populator:
        for thread in self._threads:
            thread.start()
        return self

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def _take(self) -> int | None:
        with self._lock:
            if self._stop.is_set() or self._next >= self.nchunks:
                return None
            index = self._next
            self._next += 1
            return index

    def _work(self) -> None:
        if self.nice:
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)
            except OSError:
                pass
        try:
            while (index := self._take()) is not None:
                offset = index * self.chunk_bytes
                length = min(self.chunk_bytes, self.size - offset)
                if resident(self.area, offset + length - PAGE, PAGE)[0]:
                    with self._lock:
                        self.skipped += 1  # the receive is past this chunk already
                        self._skipped_chunks.append(index)
                    continue
                if self.before_chunk is not None:
                    self.before_chunk(offset)
                populate_range(self.area, self._base, offset, length, write=self.write)
                with self._lock:
                    self.populated += 1
        except OSError as exc:
            with self._lock:
                if self.error is None:
                    self.error = exc
            self._stop.set()
        except BaseException:  # a bug: it must not take the daemon down, and finish() must know
            log.exception("guest memory population failed")
            with self._lock:
                if self.error is None:
                    self.error = OSError(errno.EIO, "guest memory population failed (see the daemon log)")
            self._stop.set()
        finally:
            with self._lock:
                self._running -= 1
                if self._running == 0:
                    self.done_at = time.monotonic()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the workers to run out of chunks (without stopping them); True if they did."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not self.running

    def stop(self) -> None:
        """Stop the workers (each ends its chunk) and let go of the mapping; idempotent."""
        self._stop.set()
        for thread in self._threads:
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join()
        self._anchor = None

    def finish(self, what: str = "guest memory") -> None:
        """Stop, then make sure every page exists; DriverError (and a log line) if some cannot be had."""
        self.stop()
        if self.error is None:
            try:
                self._fill_holes()
            except OSError as exc:
                self.error = exc
        if self.error is not None:
            detail = self.error.strerror or str(self.error)
            raise DriverError(f"could not set aside {what} ({self.size >> 20} MiB): {detail}")

    def _fill_holes(self) -> None:
        """Populate what may be missing: chunks never taken, and those skipped (only their last page was seen).

        A chunk a worker populated is all there; checking only the rest keeps
        ``finish`` (inside a live migration's downtime) at microseconds when
        the workers were done, instead of a ``mincore`` over all of memory.
        """
        unsure = sorted(set(self._skipped_chunks) | set(range(self._next, self.nchunks)))
        if not unsure:
            return
        anchor, base = _address(self.area)
        try:
            for index in unsure:
                offset = index * self.chunk_bytes
                length = min(self.chunk_bytes, self.size - offset)
                missing = ~resident(self.area, offset, length)
                if not missing.any():
                    continue
                edges = np.flatnonzero(np.diff(np.concatenate(([0], missing.view(np.int8), [0]))))
                for start, stop in zip(edges[0::2].tolist(), edges[1::2].tolist()):
                    populate_range(self.area, base, offset + start * PAGE, (stop - start) * PAGE, write=self.write)
        finally:
            del anchor
