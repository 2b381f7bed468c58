"""engine/pages.py against naive pure-Python references on random inputs."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relocd.engine import pages
from relocd.engine.pages import (
    bitmap_to_pfns,
    contiguous_runs,
    empty_bitmap,
    iter_batches,
    memory_digest,
    page_buffers,
    pfns_to_bitmap,
    scatter_pages,
    split_zero_pages,
    zero_pages,
)
from relocd.errors import ProtocolError
from relocd.units import PAGE_SIZE

# -- naive references -----------------------------------------------------------


def ref_bitmap_to_pfns(words: list[int], npages: int) -> list[int]:
    return [
        w * 64 + b
        for w, word in enumerate(words)
        for b in range(64)
        if (word >> b) & 1 and w * 64 + b < npages
    ]


def ref_runs(pfns: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for p in pfns:
        if runs and runs[-1][0] + runs[-1][1] == p:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((p, 1))
    return runs


def make_memory(npages: int, data_pages: set[int], rng: np.random.Generator) -> memoryview:
    buf = bytearray(npages * PAGE_SIZE)
    for p in data_pages:
        # One non-zero byte at a random offset: defeats the sampled words.
        off = int(rng.integers(0, PAGE_SIZE))
        buf[p * PAGE_SIZE + off] = int(rng.integers(1, 256))
    return memoryview(buf)


def pfns(xs: list[int]) -> np.ndarray:
    return np.array(xs, dtype=np.uint64)


# -- bitmaps --------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    words=st.lists(st.integers(0, 2**64 - 1), max_size=12),
    npages=st.integers(0, 12 * 64 + 10),
)
def test_bitmap_to_pfns_matches_reference(words: list[int], npages: int) -> None:
    bitmap = np.array(words, dtype=np.uint64)
    got = bitmap_to_pfns(bitmap, npages)
    assert got.dtype == np.uint64
    assert got.tolist() == ref_bitmap_to_pfns(words, npages)


def test_bits_past_npages_are_ignored() -> None:
    bitmap = np.full(2, 2**64 - 1, dtype=np.uint64)
    assert bitmap_to_pfns(bitmap, 70).tolist() == list(range(70))
    assert bitmap_to_pfns(bitmap, 0).tolist() == []


def test_high_bit_of_word_is_last_page_of_word() -> None:
    bitmap = np.array([1 << 63, 1], dtype=np.uint64)
    assert bitmap_to_pfns(bitmap, 128).tolist() == [63, 64]


def test_bitmap_to_pfns_large_sparse_and_dense() -> None:
    npages = 1 << 18  # 1 GiB
    rng = np.random.default_rng(7)
    chosen = np.unique(rng.integers(0, npages, 5000)).astype(np.uint64)
    assert np.array_equal(bitmap_to_pfns(pfns_to_bitmap(chosen, npages), npages), chosen)
    full = np.full(npages // 64, 2**64 - 1, dtype=np.uint64)
    assert np.array_equal(bitmap_to_pfns(full, npages), np.arange(npages, dtype=np.uint64))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 700).flatmap(lambda n: st.tuples(st.just(n), st.sets(st.integers(0, n - 1)))))
def test_pfns_to_bitmap_round_trip(case: tuple[int, set[int]]) -> None:
    npages, chosen = case
    bitmap = pfns_to_bitmap(pfns(sorted(chosen)), npages)
    assert bitmap.dtype == np.uint64
    assert len(bitmap) == (npages + 63) // 64
    words = [int(w) for w in bitmap]
    assert ref_bitmap_to_pfns(words, 10**9) == sorted(chosen)  # nothing past npages
    assert bitmap_to_pfns(bitmap, npages).tolist() == sorted(chosen)


def test_empty_bitmap() -> None:
    assert empty_bitmap(65).tolist() == [0, 0]
    assert empty_bitmap(64).tolist() == [0]
    assert empty_bitmap(0).size == 0


def test_pfns_to_bitmap_refuses_out_of_range() -> None:
    with pytest.raises(ValueError):
        pfns_to_bitmap(pfns([64]), 64)


# -- runs and batches -----------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(st.sets(st.integers(0, 300)))
def test_contiguous_runs_matches_reference(chosen: set[int]) -> None:
    xs = sorted(chosen)
    assert contiguous_runs(pfns(xs)) == ref_runs(xs)


def test_contiguous_runs_unsorted_input_breaks_runs() -> None:
    assert contiguous_runs(pfns([5, 6, 2, 3, 9])) == [(5, 2), (2, 2), (9, 1)]
    assert contiguous_runs(pfns([])) == []


def test_iter_batches() -> None:
    xs = pfns(list(range(10)))
    assert [b.tolist() for b in iter_batches(xs, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert list(iter_batches(pfns([]), 4)) == []
    with pytest.raises(ValueError):
        list(iter_batches(xs, 0))


# -- zero pages -----------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 3000).flatmap(
        lambda n: st.tuples(
            st.just(n), st.sets(st.integers(0, n - 1)), st.sets(st.integers(0, n - 1))
        )
    ),
    st.integers(0, 2**32),
)
def test_split_zero_pages_matches_reference(
    case: tuple[int, set[int], set[int]], seed: int
) -> None:
    npages, data, asked = case
    rng = np.random.default_rng(seed)
    mem = make_memory(npages, data, rng)
    want = sorted(asked)
    data_pfns, zero_pfns = split_zero_pages(mem, pfns(want))
    assert data_pfns.tolist() == [p for p in want if p in data]
    assert zero_pfns.tolist() == [p for p in want if p not in data]


@pytest.mark.parametrize("density", [0.0, 0.02, 0.5, 1.0])
def test_split_zero_pages_contiguous_chunks(density: float) -> None:
    # Round 1 asks for every page: exercises the in-place contiguous scan.
    npages = 3 * pages.SCAN_CHUNK_PAGES + 5
    rng = np.random.default_rng(1)
    data = {int(p) for p in np.flatnonzero(rng.random(npages) < density)}
    mem = make_memory(npages, data, rng)
    data_pfns, zero_pfns = split_zero_pages(mem, np.arange(npages, dtype=np.uint64))
    assert data_pfns.tolist() == sorted(data)
    assert len(zero_pfns) == npages - len(data)


def test_split_zero_pages_last_byte_counts() -> None:
    buf = bytearray(3 * PAGE_SIZE)
    buf[2 * PAGE_SIZE - 1] = 1  # last byte of page 1
    data_pfns, zero_pfns = split_zero_pages(memoryview(buf), pfns([0, 1, 2]))
    assert data_pfns.tolist() == [1]
    assert zero_pfns.tolist() == [0, 2]


def test_split_zero_pages_refuses_out_of_range() -> None:
    with pytest.raises(ValueError):
        split_zero_pages(memoryview(bytearray(PAGE_SIZE)), pfns([1]))


# -- moving pages ---------------------------------------------------------------


def numbered_memory(npages: int) -> bytearray:
    """Every page filled with its own index (mod 251, never zero)."""
    return bytearray(b"".join(bytes([p % 251 + 1]) * PAGE_SIZE for p in range(npages)))


def test_page_buffers_are_zero_copy_slices_per_run() -> None:
    buf = numbered_memory(40)
    mem = memoryview(buf)
    bufs = page_buffers(mem, pfns([1, 2, 3, 10, 20, 21]))
    assert [len(b) for b in bufs] == [3 * PAGE_SIZE, PAGE_SIZE, 2 * PAGE_SIZE]
    buf[PAGE_SIZE] = 0xEE  # written after the call: visible through the view
    assert bufs[0][0] == 0xEE
    assert bufs[1][0] == 11


@settings(max_examples=40, deadline=None)
@given(st.sets(st.integers(0, 199), max_size=200), st.integers(1, 12))
def test_page_buffers_bytes_and_iov_limit(chosen: set[int], max_iov: int) -> None:
    buf = numbered_memory(200)
    want = sorted(chosen)
    bufs = page_buffers(memoryview(buf), pfns(want), max_iov=max_iov)
    assert len(bufs) <= max_iov
    expected = b"".join(bytes(buf[p * PAGE_SIZE : (p + 1) * PAGE_SIZE]) for p in want)
    assert b"".join(bytes(b) for b in bufs) == expected


def test_page_buffers_keeps_long_runs_direct_when_gathering() -> None:
    buf = numbered_memory(200)
    want = [0, 2, 4] + list(range(50, 50 + pages.MIN_DIRECT_RUN_PAGES)) + [100, 102]
    bufs = page_buffers(memoryview(buf), pfns(want), max_iov=4)
    assert [len(b) // PAGE_SIZE for b in bufs] == [3, pages.MIN_DIRECT_RUN_PAGES, 2]
    buf[50 * PAGE_SIZE] = 0  # the long run is still a view of guest memory
    assert bufs[1][0] == 0


def test_scatter_pages_matches_reference() -> None:
    rng = np.random.default_rng(3)
    npages = 64
    buf = bytearray(npages * PAGE_SIZE)
    target = sorted(int(p) for p in rng.choice(npages, 20, replace=False))
    staging = bytearray(rng.integers(0, 256, 32 * PAGE_SIZE, dtype=np.uint8).tobytes())
    scatter_pages(memoryview(buf), pfns(target), memoryview(staging))
    ref = bytearray(npages * PAGE_SIZE)
    for k, p in enumerate(target):
        ref[p * PAGE_SIZE : (p + 1) * PAGE_SIZE] = staging[k * PAGE_SIZE : (k + 1) * PAGE_SIZE]
    assert buf == ref


def test_scatter_pages_rejects_hostile_pfns_and_short_staging() -> None:
    mem = memoryview(bytearray(4 * PAGE_SIZE))
    with pytest.raises(ProtocolError):
        scatter_pages(mem, pfns([4]), memoryview(bytearray(PAGE_SIZE)))
    with pytest.raises(ValueError):
        scatter_pages(mem, pfns([0, 1]), memoryview(bytearray(PAGE_SIZE)))


@pytest.mark.parametrize("chosen", [[1, 3, 7], list(range(2, 40)), []])
def test_zero_pages(chosen: list[int]) -> None:
    buf = numbered_memory(48)
    zero_pages(memoryview(buf), pfns(chosen))
    for p in range(48):
        page = bytes(buf[p * PAGE_SIZE : (p + 1) * PAGE_SIZE])
        assert (page == bytes(PAGE_SIZE)) == (p in chosen)
    with pytest.raises(ProtocolError):
        zero_pages(memoryview(buf), pfns([48]))


def test_memory_digest_is_blake3_or_sha256_of_everything() -> None:
    import blake3

    from relocd.protocol.codes import DigestAlgo

    rng = np.random.default_rng(5)
    data = rng.integers(0, 256, 3 * pages.DIGEST_CHUNK_BYTES // 2, dtype=np.uint8).tobytes()
    assert memory_digest(memoryview(data)) == blake3.blake3(data).digest()
    assert memory_digest(memoryview(data), DigestAlgo.SHA256) == hashlib.sha256(data).digest()
    assert memory_digest(memoryview(b"")) == blake3.blake3(b"").digest()


def test_split_zero_pages_unsorted_input_that_looks_contiguous() -> None:
    buf = bytearray(4 * PAGE_SIZE)
    buf[3 * PAGE_SIZE + 100] = 1  # only page 3 holds data
    data_pfns, zero_pfns = split_zero_pages(memoryview(buf), pfns([0, 3, 1, 3]))
    assert data_pfns.tolist() == [3, 3]
    assert zero_pfns.tolist() == [0, 1]


@pytest.mark.parametrize("fraction", [1, 10**9])  # force the sparse, then the dense path
@settings(max_examples=40, deadline=None)
@given(
    words=st.lists(
        st.one_of(st.just(0), st.integers(0, 2**64 - 1), st.sampled_from([1, 1 << 63])),
        max_size=20,
    ),
    npages=st.integers(0, 20 * 64 + 10),
)
def test_both_bitmap_paths_match_reference(fraction: int, words: list[int], npages: int) -> None:
    # Hypothesis' health check objects to function-scoped fixtures: patch by hand.
    saved = pages.DENSE_BITMAP_FRACTION
    pages.DENSE_BITMAP_FRACTION = fraction
    try:
        got = bitmap_to_pfns(np.array(words, dtype=np.uint64), npages)
    finally:
        pages.DENSE_BITMAP_FRACTION = saved
    assert got.tolist() == ref_bitmap_to_pfns(words, npages)


def test_sparse_bitmap_of_a_large_guest() -> None:
    npages = 1 << 18
    chosen = np.array([0, 63, 64, 4095, 100_000, npages - 1], dtype=np.uint64)
    assert bitmap_to_pfns(pfns_to_bitmap(chosen, npages), npages).tolist() == chosen.tolist()
