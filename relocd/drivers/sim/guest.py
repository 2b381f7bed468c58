"""The simulated guest inside a sim domain process: its workload thread and its dirty log.

Why the dirty log cannot lose a write
-------------------------------------
The workload thread, holding ``lock``, writes a page (contents, then its
generation-table entry) and only *then* sets the dirty bits of the page and of
its table page.  Fetch-and-clear holds the same lock while it copies the live
log into the shared snapshot and clears it.  So a fetch sees either

* none of a write (the write comes after: its bits land in the next round), or
* all of it, bits included (the copy the engine makes after this fetch
  already holds the new contents).

Setting the bit *before* writing would let a fetch slip between the two: the
bit would be cleared, the engine would copy the old page, and the write that
follows would never be reported again -- a lost page.  Without the lock, bits
set between the copy and the clear would vanish the same way.  ``pause``
takes the lock too and every write checks ``running`` under it, so once pause
returns no write can land.
"""

from __future__ import annotations

import json
import logging
import mmap
import threading
import time
from typing import Any

import numpy as np

from relocd.drivers.sim import status as status_area
from relocd.drivers.sim.invariant import TABLE_SHIFT
from relocd.drivers.sim.workload import (
    PagePicker,
    PageWriter,
    WorkloadProgress,
    WorkloadSpec,
    table_pages_of,
)
from relocd.units import PAGE_SIZE

log = logging.getLogger(__name__)

STATE_DRIVER = "sim"
STATE_FORMAT = 1
MAX_STATE_BYTES = 1 << 20
TICK_S = 0.005
MAX_BACKLOG_S = 0.05  # after a stall, catch up at most this much time
CHUNK_PAGES = 256  # pages written per lock hold: bounds how long pause waits


class GuestError(Exception):
    """A request the guest cannot honour (answered to the daemon, not a crash)."""


class Guest:
    """Guest memory, the workload that dirties it, and the simulated dirty log."""

    def __init__(self, memory: mmap.mmap, status: mmap.mmap, npages: int, spec: WorkloadSpec, seed: int) -> None:
        self.npages = npages
        self.spec = spec
        self.lock = threading.Lock()
        self._memory = memory
        self._status = status
        self._view = memoryview(memory)
        self.writer = PageWriter(self._view, npages)
        self.picker = PagePicker(spec, self.writer)
        self.progress = WorkloadProgress(rng=np.random.default_rng(seed))
        self.running = False
        #: auto-converge: the share of the time the guest is kept from running
        self.throttle = 0.0
        self.logging = False
        self._dirty = np.zeros(status_area.bitmap_words(npages) * 64, dtype=np.bool_)
        self._snapshot = np.frombuffer(
            status, dtype="<u8", count=status_area.bitmap_words(npages), offset=status_area.BITMAP_OFFSET
        )
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="workload", daemon=True)
        self.publish()

    # ---------------------------------------------------------------- lifecycle

    def boot(self) -> None:
        """Initialise memory as a freshly booted guest would (before anyone can see it)."""
        self.writer.boot(self.spec.fill)

    def start_thread(self) -> None:
        self._thread.start()

    def stop_thread(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)

    def configure(self, spec: WorkloadSpec) -> None:
        """Take the workload of an incoming domain (its config arrives after the build)."""
        with self.lock:
            if self.running:
                raise GuestError("configure needs a domain that has not started")
            self.spec = spec
            self.picker = PagePicker(spec, self.writer)

    def pause(self) -> None:
        with self.lock:
            self.running = False
            self.publish()

    def resume(self) -> None:
        with self.lock:
            self.running = True
            self.publish()
        self._wake.set()

    # ---------------------------------------------------------------- dirty log

    def dirty_start(self) -> None:
        with self.lock:
            self._dirty[:] = False
            self.logging = True
            self.publish()

    def dirty_stop(self) -> None:
        with self.lock:
            self.logging = False
            self._dirty[:] = False
            self.publish()

    def dirty_fetch(self) -> int:
        """Move the live log into the shared snapshot and clear it, atomically; returns the dirty count."""
        with self.lock:
            if not self.logging:
                raise GuestError("dirty log is not started")
            packed = np.packbits(self._dirty, bitorder="little")
            self._snapshot[:] = packed.view("<u8")
            count = int(np.count_nonzero(self._dirty))
            self._dirty[:] = False
        return count

    # ---------------------------------------------------------------- state

    def save_state(self) -> str:
        """The workload's progress as a versioned JSON blob (the guest's "vCPU state")."""
        with self.lock:
            if self.running:
                raise GuestError("save_state needs a paused domain")
            p = self.progress
            return json.dumps(
                {
                    "driver": STATE_DRIVER,
                    "format": STATE_FORMAT,
                    "workload": str(self.spec),
                    "npages": self.npages,
                    "ticks": p.ticks,
                    "pages_written": p.pages_written,
                    "sweep_pos": p.sweep_pos,
                    "rng": p.rng.bit_generator.state,
                },
                separators=(",", ":"),
            )

    def load_state(self, blob: str) -> None:
        """Continue where a saved guest stopped; checks the blob before touching anything."""
        if len(blob) > MAX_STATE_BYTES:
            raise GuestError(f"state blob is larger than {MAX_STATE_BYTES} bytes")
        try:
            state: Any = json.loads(blob)
        except ValueError:
            raise GuestError("state blob is not valid JSON") from None
        if not isinstance(state, dict) or state.get("driver") != STATE_DRIVER:
            raise GuestError("state blob was not saved by the sim driver")
        if state.get("format") != STATE_FORMAT:
            raise GuestError(f"state blob has format {state.get('format')!r}, this guest reads {STATE_FORMAT}")
        if state.get("npages") != self.npages:
            raise GuestError(f"state blob is for {state.get('npages')} pages, this guest has {self.npages}")
        try:
            rng = np.random.default_rng()
            rng.bit_generator.state = state["rng"]
            progress = WorkloadProgress(
                rng=rng,
                ticks=int(state["ticks"]),
                pages_written=int(state["pages_written"]),
                sweep_pos=int(state["sweep_pos"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise GuestError(f"state blob is incomplete or corrupt: {exc}") from None
        with self.lock:
            if self.running:
                raise GuestError("load_state needs a paused domain")
            self.progress = progress
            self.publish()

    def publish(self) -> None:
        """Refresh the shared status header (callers hold the lock, or nothing runs yet)."""
        p = self.progress
        status_area.StatusHeader(
            ticks=p.ticks,
            pages_written=p.pages_written,
            running=self.running,
            logging=self.logging,
            sweep_pos=p.sweep_pos,
            npages=self.npages,
        ).write(self._status)

    # ---------------------------------------------------------------- workload thread

    def _run(self) -> None:
        try:
            self._pace()
        except Exception:  # the guest "crashes": it stops writing but still answers the daemon
            log.exception("workload thread died")
            with self.lock:
                self.running = False
                self.publish()

    def _pace(self) -> None:
        """Write at the spec's rate in ``TICK_S`` ticks, carrying fractional pages over."""
        credit = 0.0
        last = time.monotonic()
        while not self._stop.is_set():
            if not self.running:
                self._wake.wait(0.1)
                self._wake.clear()
                last = time.monotonic()
                credit = 0.0
                continue
            now = time.monotonic()
            rate_pages = self.spec.rate_bytes / PAGE_SIZE if self.picker.writes_anything else 0.0
            rate_pages *= 1.0 - self.throttle  # auto-converge: the guest runs this share of the time
            credit = min(credit + rate_pages * (now - last), rate_pages * MAX_BACKLOG_S + 1)
            last = now
            todo = int(credit)
            credit -= todo
            self._tick(todo)
            self._stop.wait(max(0.0, TICK_S - (time.monotonic() - now)))

    def _tick(self, todo: int) -> None:
        """One workload tick: ``todo`` page writes in lock-sized chunks."""
        with self.lock:
            if not self.running:
                return
            self.progress.ticks += 1
            self.publish()
        while todo > 0:
            n = min(todo, CHUNK_PAGES)
            todo -= n
            with self.lock:
                if not self.running:
                    return
                self._write_chunk(n)
                self.progress.pages_written += n
                self.publish()

    def _write_chunk(self, n: int) -> None:
        """Write ``n`` pages then mark them (and their table pages) dirty; caller holds the lock."""
        if self.spec.kind == "sweep":
            for start, count in self.picker.sweep_runs(self.progress, n):
                self.writer.write_run(start, count)
                self._dirty[start : start + count] = True
                self._dirty[start >> TABLE_SHIFT : ((start + count - 1) >> TABLE_SHIFT) + 1] = True
        else:
            index = self.picker.random_pages(self.progress, n)
            self.writer.write_pages(index)
            self._dirty[index] = True
            self._dirty[table_pages_of(index)] = True
