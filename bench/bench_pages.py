"""Time the per-round page bookkeeping over a 1 GiB guest.

Not a test: run ``python bench/bench_pages.py`` by hand.  Each line prints the
best of a few runs and its ratio to a plain numpy copy of the same bytes, the
yardstick for "costs about as much as touching the memory once".
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from relocd.engine.pages import bitmap_to_pfns, pfns_to_bitmap, split_zero_pages
from relocd.units import PAGE_SIZE

NPAGES = 1 << 18  # 1 GiB
REPEATS = 3


def best_ms(fn: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1000


def memcpy_ms(nbytes: int, src: np.ndarray, dst: np.ndarray) -> float:
    return best_ms(lambda: np.copyto(dst[:nbytes], src[:nbytes]))


def report(label: str, ms: float, baseline_ms: float) -> None:
    print(f"{label:<48} {ms:9.2f} ms   {ms / baseline_ms:8.2f}x memcpy of the same bytes")


def main() -> None:
    rng = np.random.default_rng(0)
    memory = np.zeros(NPAGES * PAGE_SIZE, dtype=np.uint8)
    dst = np.empty_like(memory)
    dst[:] = 1  # fault the copy target in before timing
    words = memory.view(np.uint64).reshape(NPAGES, PAGE_SIZE // 8)
    # Half the pages hold data (like a booted guest): every other page has a
    # header word, plus a few data pages whose only non-zero byte is deep inside.
    words[::2, 0] = np.arange(0, NPAGES, 2, dtype=np.uint64) + 1
    words[1::64, 300] = 7
    view = memory.data

    bitmap_bytes = (NPAGES // 64) * 8
    bitmap_base = memcpy_ms(bitmap_bytes, memory, dst)
    print(f"guest {NPAGES * PAGE_SIZE >> 20} MiB; bitmap {bitmap_bytes >> 10} KiB")
    print("(bitmap lines compare with copying the 32 KiB bitmap; the memory")
    print(" lines with copying the pages examined)")
    for label, count in (("few dirty (1k)", 1000), ("many dirty (50%)", NPAGES // 2)):
        chosen = np.unique(rng.integers(0, NPAGES, count)).astype(np.uint64)
        bitmap = pfns_to_bitmap(chosen, NPAGES)
        ms = best_ms(lambda: bitmap_to_pfns(bitmap, NPAGES))
        report(f"bitmap_to_pfns, {label}", ms, bitmap_base)
    full = np.full(NPAGES // 64, 2**64 - 1, dtype=np.uint64)
    report("bitmap_to_pfns, all dirty", best_ms(lambda: bitmap_to_pfns(full, NPAGES)), bitmap_base)

    for label, chosen in (
        ("all pages (round 1)", np.arange(NPAGES, dtype=np.uint64)),
        ("1k scattered", np.unique(rng.integers(0, NPAGES, 1000)).astype(np.uint64)),
        ("50% scattered", np.unique(rng.integers(0, NPAGES, NPAGES // 2)).astype(np.uint64)),
    ):
        base = memcpy_ms(len(chosen) * PAGE_SIZE, memory, dst)
        ms = best_ms(lambda: split_zero_pages(view, chosen))
        report(f"split_zero_pages, {label}", ms, base)

    memory[:] = 0
    everything = np.arange(NPAGES, dtype=np.uint64)
    base = memcpy_ms(NPAGES * PAGE_SIZE, memory, dst)
    report("split_zero_pages, all pages, all zero", best_ms(lambda: split_zero_pages(view, everything)), base)


if __name__ == "__main__":
    main()
