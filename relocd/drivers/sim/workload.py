"""The sim guest's page writer: how it carries out a ``--workload`` spec.

The spec syntax and its parser live in ``relocd.drivers.workload`` (the kvm
driver takes the same specs); they are re-exported here for older imports.
A ``hotset`` is the first ``size`` bytes of data pages, just after the
guest's generation table.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from relocd.drivers.sim import invariant
from relocd.drivers.sim.invariant import U64
from relocd.drivers.workload import Fill, WorkloadSpec, parse_workload
from relocd.units import PAGE_SIZE

__all__ = ["PagePicker", "PageWriter", "WorkloadProgress", "WorkloadSpec", "parse_workload", "table_pages_of"]


class PageWriter:
    """Writes guest pages the way the guest would: page contents, then its generation-table entry.

    Holds numpy views over guest memory; the caller provides the locking and
    marks the pages dirty afterwards (see ``guest.Guest``).
    """

    def __init__(self, memory: memoryview, npages: int) -> None:
        self.npages = npages
        self.first_data_page = invariant.table_pages(npages)
        self.data_pages = max(npages - self.first_data_page, 0)
        self._pages = invariant.page_words(memory, npages)
        self._table = invariant.generation_table(memory, npages)
        self._scratch = np.empty((0, invariant.WORDS_PER_PAGE), dtype=np.uint64)

    def boot(self, fill: Fill, *, chunk_pages: int = 4096) -> None:
        """Initialise memory as a freshly booted guest: zero, or every data page at generation 1."""
        if fill == "zero":
            return
        for start in range(self.first_data_page, self.npages, chunk_pages):
            stop = min(start + chunk_pages, self.npages)
            self.write_run(start, stop - start)

    def write_run(self, start: int, count: int) -> None:
        """Write ``count`` consecutive pages from ``start`` straight into guest memory."""
        stop = start + count
        with np.errstate(over="ignore"):
            gens = self._table[start:stop] + np.uint64(1)
            invariant.stamp_pages(self._pages[start:stop], np.arange(start, stop, dtype=np.uint64), gens)
        self._table[start:stop] = gens

    def write_pages(self, index: U64) -> None:
        """Write scattered pages (duplicates allowed: they end up at the same generation)."""
        n = len(index)
        if len(self._scratch) < n:
            self._scratch = np.empty((n, invariant.WORDS_PER_PAGE), dtype=np.uint64)
        buf = self._scratch[:n]
        with np.errstate(over="ignore"):
            gens = self._table[index] + np.uint64(1)
            invariant.stamp_pages(buf, index, gens)
        self._pages[index] = buf
        self._table[index] = gens


def table_pages_of(index: U64) -> U64:
    """The generation-table pages that hold the entries of pages ``index``."""
    return index >> np.uint64(invariant.TABLE_SHIFT)


@dataclasses.dataclass
class WorkloadProgress:
    """The workload's own state: what save_state carries so a moved guest continues."""

    rng: np.random.Generator
    ticks: int = 0
    pages_written: int = 0
    sweep_pos: int = 0


class PagePicker:
    """Which pages the next ``n`` writes go to, for a given spec and memory layout."""

    def __init__(self, spec: WorkloadSpec, writer: PageWriter) -> None:
        self.spec = spec
        self._lo = writer.first_data_page
        self._span = writer.data_pages
        if spec.kind == "hotset":
            self._span = max(1, min(spec.hot_bytes // PAGE_SIZE, writer.data_pages))

    @property
    def writes_anything(self) -> bool:
        return self.spec.kind != "idle" and self.spec.rate_bytes > 0 and self._span > 0

    def random_pages(self, progress: WorkloadProgress, n: int) -> U64:
        """``n`` random pages for uniform / hotset."""
        return progress.rng.integers(self._lo, self._lo + self._span, size=n, dtype=np.uint64)

    def sweep_runs(self, progress: WorkloadProgress, n: int) -> list[tuple[int, int]]:
        """The next ``n`` pages of a sweep as (start, count) runs; advances the sweep position."""
        runs: list[tuple[int, int]] = []
        while n > 0:
            pos = progress.sweep_pos % self._span
            count = min(n, self._span - pos)
            runs.append((self._lo + pos, count))
            progress.sweep_pos = (pos + count) % self._span
            n -= count
        return runs
