"""Workload specs (``--workload``) and the page writer that carries them out.

Spec syntax: ``KIND[:key=value,...]`` with

* ``idle`` -- writes nothing,
* ``uniform:rate=100MB/s`` -- random pages over all of memory,
* ``hotset:size=64MiB,rate=200MB/s`` -- random pages in the first ``size``
  bytes of data pages (just after the guest's generation table),
* ``sweep:rate=1GB/s`` -- every data page in order, wrapping around,

and, for every kind, ``fill=stamped|zero``: how the guest initialises memory at
boot (``stamped``, the default: every data page at generation 1, so memory is
full of non-zero data; ``zero``: pages stay zero until first written).
Missing values default to the examples above.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from relocd.drivers.sim import invariant
from relocd.drivers.sim.invariant import U64
from relocd.errors import ConfigError
from relocd.units import PAGE_SIZE, parse_rate, parse_size

Kind = Literal["idle", "uniform", "hotset", "sweep"]
Fill = Literal["stamped", "zero"]

KINDS: tuple[Kind, ...] = ("idle", "uniform", "hotset", "sweep")
FILLS: tuple[Fill, ...] = ("stamped", "zero")
DEFAULT_RATES: dict[Kind, int] = {
    "idle": 0,
    "uniform": 100 * 1000**2,
    "hotset": 200 * 1000**2,
    "sweep": 1000**3,
}
DEFAULT_HOT_BYTES = 64 << 20
_KEYS: dict[Kind, frozenset[str]] = {
    "idle": frozenset({"fill"}),
    "uniform": frozenset({"rate", "fill"}),
    "hotset": frozenset({"rate", "size", "fill"}),
    "sweep": frozenset({"rate", "fill"}),
}


@dataclasses.dataclass(frozen=True)
class WorkloadSpec:
    """A parsed ``--workload`` value."""

    kind: Kind = "idle"
    rate_bytes: int = 0
    hot_bytes: int = 0
    fill: Fill = "stamped"

    def __str__(self) -> str:
        """Canonical spec text; ``parse_workload(str(spec)) == spec``."""
        opts: list[str] = []
        if self.kind == "hotset":
            opts.append(f"size={self.hot_bytes}")
        if self.kind != "idle":
            opts.append(f"rate={self.rate_bytes}")
        if self.fill != "stamped":
            opts.append(f"fill={self.fill}")
        return self.kind + (":" + ",".join(opts) if opts else "")


def parse_workload(spec: str) -> WorkloadSpec:
    """Parse a workload spec; ConfigError with a one-line reason when it is wrong."""
    text = spec.strip()
    kind_text, _, opts_text = text.partition(":")
    kind_text = kind_text.strip().lower()
    if kind_text not in KINDS:
        raise ConfigError(f"workload {spec!r}: unknown kind {kind_text!r} (known: {', '.join(KINDS)})")
    kind: Kind = kind_text
    values: dict[str, str] = {}
    if opts_text.strip() or ":" in text:
        for item in opts_text.split(","):
            key, eq, value = (part.strip() for part in item.partition("="))
            if not eq or not key or not value:
                raise ConfigError(f"workload {spec!r}: expected key=value, got {item.strip()!r}")
            key = key.lower()
            if key not in _KEYS[kind]:
                allowed = ", ".join(sorted(_KEYS[kind]))
                raise ConfigError(f"workload {spec!r}: {kind} takes no option {key!r} (allowed: {allowed})")
            if key in values:
                raise ConfigError(f"workload {spec!r}: option {key!r} given twice")
            values[key] = value
    rate = DEFAULT_RATES[kind]
    if "rate" in values:
        try:
            rate = parse_rate(values["rate"])
        except ValueError as exc:
            raise ConfigError(f"workload {spec!r}: bad rate: {exc}") from None
        if rate <= 0:
            raise ConfigError(f"workload {spec!r}: rate must be positive")
    hot = DEFAULT_HOT_BYTES if kind == "hotset" else 0
    if "size" in values:
        try:
            hot = parse_size(values["size"])
        except ValueError as exc:
            raise ConfigError(f"workload {spec!r}: bad size: {exc}") from None
        if hot < PAGE_SIZE:
            raise ConfigError(f"workload {spec!r}: hot set must be at least one page ({PAGE_SIZE} bytes)")
    fill_text = values.get("fill", "stamped").lower()
    if fill_text not in FILLS:
        raise ConfigError(f"workload {spec!r}: fill must be one of {', '.join(FILLS)}")
    fill: Fill = fill_text
    return WorkloadSpec(kind=kind, rate_bytes=rate, hot_bytes=hot, fill=fill)


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
