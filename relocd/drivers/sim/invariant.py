"""The guest's page invariant: how a sim guest stamps its pages and how a verifier checks them.

Guest memory is laid out as:

* **generation table** -- the first ``table_pages(npages)`` pages hold one
  little-endian uint64 per page of the guest: the generation the guest last
  wrote to that page (0 = never written, the page must be all zero).  Entries
  for the table's own pages stay 0.
* **data pages** -- every other page.  A page at generation ``g >= 1`` holds
  512 uint64 words: word 0 its own page index, word 1 ``g``, words 2..510 a
  pseudo-random body derived from ``(index, g)``, word 511 a checksum of
  words 0..510.

Because the guest updates the table together with the page (both dirty in the
same dirty-log round), a migration that loses a write leaves a page whose
generation disagrees with the table (a *stale* page), not just a torn one.
Everything is numpy-vectorised: stamping is one multiply per word and the
checksum of a freshly stamped page is computed in O(1) per page (the body is
linear in the page seed), so the writer sustains GB/s on one core.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from relocd.units import PAGE_SIZE

U64 = npt.NDArray[np.uint64]

WORDS_PER_PAGE = PAGE_SIZE // 8
INDEX_WORD = 0
GEN_WORD = 1
BODY_START = 2
CHECKSUM_WORD = WORDS_PER_PAGE - 1
BODY_WORDS = CHECKSUM_WORD - BODY_START
#: Generation-table entries per table page; page ``i``'s entry lives in table page ``i >> TABLE_SHIFT``.
TABLE_SHIFT = 9

# Fixed constants: changing any of them changes what a valid page looks like.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_GEN_MUL = np.uint64(0xD1B54A32D192ED03)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_CSUM_INDEX = np.uint64(0xA24BAED4963EE407)
_CSUM_GEN = np.uint64(0x9FB21C651E98DF25)
_CSUM_MAGIC = np.uint64(0x52454C4F43442121)  # "RELOCD!!"
_BODY_KEYS: U64 = (
    np.random.Generator(np.random.PCG64(0x5EED_0F_5A6E)).integers(
        0, np.iinfo(np.uint64).max, size=BODY_WORDS, dtype=np.uint64, endpoint=True
    )
    | np.uint64(1)
)
with np.errstate(over="ignore"):
    _BODY_KEY_SUM = np.uint64(_BODY_KEYS.sum(dtype=np.uint64))

_CHECK_CHUNK_PAGES = 2048  # 8 MiB per verifier step: big enough for numpy, small enough for cache


def table_pages(npages: int) -> int:
    """Pages taken by the generation table at the start of guest memory."""
    return (npages * 8 + PAGE_SIZE - 1) // PAGE_SIZE


def page_words(memory: memoryview, npages: int) -> U64:
    """Guest memory as an ``(npages, 512)`` uint64 array (a view, no copy)."""
    return np.frombuffer(memory, dtype="<u8", count=npages * WORDS_PER_PAGE).reshape(
        npages, WORDS_PER_PAGE
    )


def generation_table(memory: memoryview, npages: int) -> U64:
    """The guest's generation table (a view into guest memory)."""
    return np.frombuffer(memory, dtype="<u8", count=npages)


def page_seeds(index: U64, gen: U64) -> U64:
    """A well-mixed 64-bit seed per (page index, generation): splitmix64's finaliser."""
    z = index * _GOLDEN + gen * _GEN_MUL
    z ^= z >> np.uint64(30)
    z *= _MIX1
    z ^= z >> np.uint64(27)
    z *= _MIX2
    z ^= z >> np.uint64(31)
    return z


def stamp_pages(out: U64, index: U64, gen: U64) -> None:
    """Write the valid contents of pages ``index`` at generations ``gen`` (all >= 1) into ``out``.

    ``out`` is ``(n, 512)``: a slice of guest memory for a contiguous run, or a
    scratch buffer that the caller scatters.
    """
    index = index.astype(np.uint64, copy=False)
    gen = gen.astype(np.uint64, copy=False)
    seeds = page_seeds(index, gen)
    out[:, INDEX_WORD] = index
    out[:, GEN_WORD] = gen
    np.multiply(seeds[:, None], _BODY_KEYS[None, :], out=out[:, BODY_START:CHECKSUM_WORD])
    # sum(seed * key_j) == seed * sum(key_j) (mod 2**64): the checksum costs O(1) per page.
    out[:, CHECKSUM_WORD] = (index * _CSUM_INDEX + gen * _CSUM_GEN + seeds * _BODY_KEY_SUM) ^ _CSUM_MAGIC


def page_checksums(words: U64) -> U64:
    """The checksum each page *should* carry, computed from what it actually holds."""
    body_sum: U64 = words[:, BODY_START:CHECKSUM_WORD].sum(axis=1, dtype=np.uint64)
    checksums: U64 = (words[:, INDEX_WORD] * _CSUM_INDEX + words[:, GEN_WORD] * _CSUM_GEN + body_sum) ^ _CSUM_MAGIC
    return checksums


def _describe_bad_page(page: int, words: U64, table_gen: int) -> str:
    """Say what is wrong with one page that failed the check (why, in operator words)."""
    held_index, held_gen = int(words[INDEX_WORD]), int(words[GEN_WORD])
    if table_gen == 0:
        return f"page {page} should be zero (never written) but holds data"
    if not words.any():
        return f"page {page} is zero but the guest wrote generation {table_gen}"
    self_consistent = int(page_checksums(words[None, :])[0]) == int(words[CHECKSUM_WORD])
    if not self_consistent:
        return f"page {page} is torn (checksum mismatch)"
    if held_index != page:
        return f"page {page} holds page {held_index}'s contents"
    if held_gen != table_gen:
        age = "stale" if held_gen < table_gen else "ahead of its table entry"
        return f"page {page} is {age}: generation {held_gen}, table says {table_gen}"
    return f"page {page} body does not match generation {held_gen}"


def check_invariant(memory: memoryview, npages: int, *, max_reports: int = 3) -> str | None:
    """Check every page against the guest's generation table; None when all hold.

    Run it on a paused guest or a consistent copy: a running guest changes
    pages under the checker's feet.
    """
    if len(memory) < npages * PAGE_SIZE:
        return f"memory is {len(memory)} bytes, expected {npages * PAGE_SIZE}"
    ntable = table_pages(npages)
    if ntable >= npages:
        return None
    with np.errstate(over="ignore"):
        table = generation_table(memory, npages)
        words = page_words(memory, npages)
        if table[:ntable].any():
            first = int(np.flatnonzero(table[:ntable])[0])
            return f"generation table entry for table page {first} is {int(table[first])}, expected 0"
        bad_pages: list[int] = []
        nbad = 0
        expected = np.empty((_CHECK_CHUNK_PAGES, WORDS_PER_PAGE), dtype=np.uint64)
        differs = np.empty((_CHECK_CHUNK_PAGES, WORDS_PER_PAGE), dtype=np.bool_)
        for start in range(ntable, npages, _CHECK_CHUNK_PAGES):
            stop = min(start + _CHECK_CHUNK_PAGES, npages)
            n = stop - start
            gens = table[start:stop]
            exp, diff = expected[:n], differs[:n]
            stamp_pages(exp, np.arange(start, stop, dtype=np.uint64), gens)
            unwritten = gens == 0
            if unwritten.any():
                exp[unwritten] = 0
            np.not_equal(words[start:stop], exp, out=diff)
            bad = np.flatnonzero(diff.any(axis=1))
            if bad.size:
                nbad += int(bad.size)
                bad_pages.extend(int(start + b) for b in bad[: max_reports - len(bad_pages)])
        if not nbad:
            return None
        details = "; ".join(_describe_bad_page(p, words[p], int(table[p])) for p in bad_pages)
    more = f" (and {nbad - len(bad_pages)} more)" if nbad > len(bad_pages) else ""
    return f"{nbad} bad page{'s' if nbad != 1 else ''}: {details}{more}"
