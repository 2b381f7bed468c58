"""Page bookkeeping for the precopy loop: dirty bitmaps, pfn lists, zero pages.

Guest memory is one writable memoryview of ``npages * PAGE_SIZE`` bytes; dirty
bitmaps are numpy ``uint64`` arrays in KVM's layout (bit ``i % 64`` of word
``i // 64`` is page ``i``); pfn lists are sorted ``uint64`` arrays.  Everything
here is vectorised with numpy because it runs once per round over up to
millions of pages, and nothing here copies guest memory unless it says so:
the send path hands memoryview slices to ``sendmsg`` and the receive path reads
straight into guest memory.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import blake3
import numpy as np
import numpy.typing as npt

from relocd.errors import ProtocolError
from relocd.protocol.codes import DigestAlgo
from relocd.units import PAGE_SIZE

Pfns = npt.NDArray[np.uint64]
Bitmap = npt.NDArray[np.uint64]

WORDS_PER_PAGE = PAGE_SIZE // 8
BITS_PER_WORD = 64

#: Pages examined per numpy call when scanning memory: bounds temporaries to a
#: few MiB whatever the size of the guest.
SCAN_CHUNK_PAGES = 1024

#: Bytes hashed per ``update`` call (hashlib drops the GIL for each call).
DIGEST_CHUNK_BYTES = 4 << 20

#: Runs at least this long stay zero-copy when ``page_buffers`` must gather.
MIN_DIRECT_RUN_PAGES = 16

#: Above one hot word in this many, bitmap_to_pfns unpacks the whole bitmap
#: (measured break-even: gathering costs ~3x more per word than a full unpack).
DENSE_BITMAP_FRACTION = 4

#: Words sampled in each page before the full all-zero scan: guest pages that
#: hold data almost always have one of these set, so most never get scanned.
_SAMPLE_WORDS = (0, WORDS_PER_PAGE - 1)


def _bitmap_words(npages: int) -> int:
    return (npages + BITS_PER_WORD - 1) // BITS_PER_WORD


def _as_pfns(pfns: npt.ArrayLike) -> Pfns:
    return np.ascontiguousarray(pfns, dtype=np.uint64).reshape(-1)


def _pages(memory: memoryview) -> npt.NDArray[np.uint8]:
    """Guest memory as an (npages, PAGE_SIZE) uint8 array sharing its buffer."""
    flat = np.frombuffer(memory, dtype=np.uint8)
    if flat.size % PAGE_SIZE:
        raise ValueError(f"guest memory is {flat.size} bytes, not a whole number of pages")
    return flat.reshape(-1, PAGE_SIZE)


def _page_words(memory: memoryview) -> npt.NDArray[np.uint64]:
    """Guest memory as an (npages, 512) uint64 array sharing its buffer."""
    flat = np.frombuffer(memory, dtype=np.uint8)
    if flat.size % PAGE_SIZE:
        raise ValueError(f"guest memory is {flat.size} bytes, not a whole number of pages")
    return flat.view(np.uint64).reshape(-1, WORDS_PER_PAGE)


def _check_local(pfns: Pfns, npages: int) -> None:
    """Our own pfn lists must fit the guest; a miss is a local bug."""
    if len(pfns) and int(pfns.max()) >= npages:
        raise ValueError(f"page {int(pfns.max())} is beyond the guest's {npages} pages")


def _check_remote(pfns: Pfns, npages: int) -> None:
    """Pfns that came from the peer must fit the guest before we write to it."""
    if len(pfns) and int(pfns.max()) >= npages:
        raise ProtocolError(
            f"peer sent page {int(pfns.max())}, beyond the domain's {npages} pages"
        )


# -- bitmaps ------------------------------------------------------------------


def empty_bitmap(npages: int) -> Bitmap:
    """A bitmap with room for ``npages`` pages and no bit set."""
    if npages < 0:
        raise ValueError("npages must not be negative")
    return np.zeros(_bitmap_words(npages), dtype=np.uint64)


def bitmap_to_pfns(bitmap: Bitmap, npages: int) -> Pfns:
    """Sorted pfns of the set bits; bits at or past ``npages`` are ignored.

    Only words with a bit set are unpacked, so a nearly clean 1 GiB bitmap
    costs one pass over its 32 KiB, and a full one a single unpack.
    """
    words = np.asarray(bitmap, dtype=np.uint64).reshape(-1)[: _bitmap_words(npages)]
    hot = np.flatnonzero(words)
    if hot.size == 0:
        return np.empty(0, dtype=np.uint64)
    if hot.size * DENSE_BITMAP_FRACTION > words.size:
        # Dense: one unpack of everything beats gathering the hot words.
        every_bit = np.unpackbits(words.astype("<u8", copy=False).view(np.uint8), bitorder="little")
        return np.flatnonzero(every_bit[:npages]).astype(np.uint64)
    # Little-endian bytes so bit k of a word is bit k % 8 of byte k // 8.
    hot_bytes = words[hot].astype("<u8", copy=False).view(np.uint8)
    bits = np.unpackbits(hot_bytes, bitorder="little").reshape(hot.size, BITS_PER_WORD)
    rows, cols = np.nonzero(bits)
    pfns = hot[rows].astype(np.uint64) * np.uint64(BITS_PER_WORD) + cols.astype(np.uint64)
    end = int(np.searchsorted(pfns, np.uint64(npages)))
    return pfns[:end]


def pfns_to_bitmap(pfns: npt.ArrayLike, npages: int) -> Bitmap:
    """The bitmap with exactly the bits of ``pfns`` set (the inverse of bitmap_to_pfns)."""
    pfn_array = _as_pfns(pfns)
    _check_local(pfn_array, npages)
    nwords = _bitmap_words(npages)
    bits = np.zeros(nwords * BITS_PER_WORD, dtype=np.uint8)
    bits[pfn_array] = 1
    packed = np.packbits(bits, bitorder="little")
    return packed.view("<u8").astype(np.uint64)


# -- pfn lists ----------------------------------------------------------------


def iter_batches(pfns: Pfns, max_pages: int) -> Iterator[Pfns]:
    """Consecutive slices (views, not copies) of at most ``max_pages`` pfns."""
    if max_pages < 1:
        raise ValueError("max_pages must be at least 1")
    for start in range(0, len(pfns), max_pages):
        yield pfns[start : start + max_pages]


def _run_bounds(pfns: Pfns) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """Index of the first pfn of each run of consecutive pfns, and of the one past its end."""
    if len(pfns) == 0:
        empty = np.empty(0, dtype=np.intp)
        return empty, empty
    steps = np.diff(pfns.astype(np.int64))
    breaks = np.flatnonzero(steps != 1) + 1
    starts = np.concatenate(([0], breaks)).astype(np.intp)
    ends = np.concatenate((breaks, [len(pfns)])).astype(np.intp)
    return starts, ends


def contiguous_runs(pfns: Pfns) -> list[tuple[int, int]]:
    """``(first pfn, count)`` for each run of consecutive pfns, in order."""
    pfn_array = _as_pfns(pfns)
    starts, ends = _run_bounds(pfn_array)
    firsts = pfn_array[starts].tolist()
    counts = (ends - starts).tolist()
    return list(zip(firsts, counts))


# -- zero pages ---------------------------------------------------------------


def split_zero_pages(memory: memoryview, pfns: Pfns) -> tuple[Pfns, Pfns]:
    """Split ``pfns`` into (pages holding data, all-zero pages); both keep their order.

    Zero pages travel as bare pfns.  The first and last word of every page
    are sampled first (no page copy); only pages whose samples are zero get
    the full scan, which reads contiguous stretches in place and gathers
    scattered pages ``SCAN_CHUNK_PAGES`` at a time.
    """
    pfn_array = _as_pfns(pfns)
    words = _page_words(memory)
    _check_local(pfn_array, len(words))
    if len(pfn_array) == 0:
        return pfn_array.copy(), pfn_array.copy()
    is_data = np.empty(len(pfn_array), dtype=bool)
    for lo in range(0, len(pfn_array), SCAN_CHUNK_PAGES):
        chunk = pfn_array[lo : lo + SCAN_CHUNK_PAGES]
        first = int(chunk[0])
        contiguous = int(chunk[-1]) - first == len(chunk) - 1 and bool(
            np.all(chunk[1:] - chunk[:-1] == 1)  # guards unsorted input
        )
        rows = chunk.astype(np.intp)
        # Strided views when contiguous, small 1-D gathers otherwise.
        in_chunk = words[first : first + len(chunk)] if contiguous else None
        sampled = np.zeros(len(chunk), dtype=bool)
        for col in _SAMPLE_WORDS:
            column = in_chunk[:, col] if in_chunk is not None else words[rows, col]
            sampled |= column != 0
        unsure = np.flatnonzero(~sampled)
        if unsure.size:
            if in_chunk is not None and 2 * unsure.size > len(chunk):
                # Mostly unsure and contiguous: scan the stretch in place, no copy.
                np.any(in_chunk, axis=1, out=sampled)
            else:
                sampled[unsure] = words[rows[unsure]].any(axis=1)
        is_data[lo : lo + len(chunk)] = sampled
    return pfn_array[is_data], pfn_array[~is_data]


# -- moving pages -------------------------------------------------------------


def page_buffers(memory: memoryview, pfns: Pfns, max_iov: int = 1024) -> list[memoryview]:
    """Buffers holding the pages of ``pfns`` in order, for one gather write.

    Normally one zero-copy memoryview slice of guest memory per contiguous
    run.  Should that take more than ``max_iov`` buffers (``sendmsg``'s
    IOV_MAX), consecutive short runs are gathered into copied buffers, and
    failing that all pages are: the bytes are the same, only copied.
    """
    if max_iov < 1:
        raise ValueError("max_iov must be at least 1")
    pfn_array = _as_pfns(pfns)
    flat = memory.cast("B") if memory.format != "B" or memory.ndim != 1 else memory
    npages = len(flat) // PAGE_SIZE
    _check_local(pfn_array, npages)
    starts, ends = _run_bounds(pfn_array)
    firsts = pfn_array[starts].tolist()
    counts = (ends - starts).tolist()

    def direct(first: int, count: int) -> memoryview:
        return flat[first * PAGE_SIZE : (first + count) * PAGE_SIZE]

    if len(firsts) <= max_iov:
        return [direct(f, c) for f, c in zip(firsts, counts)]

    pages = _pages(flat)

    def gathered(lo: int, hi: int) -> memoryview:
        return pages[pfn_array[lo:hi].astype(np.intp)].reshape(-1).data

    buffers: list[memoryview] = []
    short_from = -1  # index into pfn_array where pending short runs begin
    for first, count, lo, hi in zip(firsts, counts, starts.tolist(), ends.tolist()):
        if count >= MIN_DIRECT_RUN_PAGES:
            if short_from >= 0:
                buffers.append(gathered(short_from, lo))
                short_from = -1
            buffers.append(direct(first, count))
        elif short_from < 0:
            short_from = lo
    if short_from >= 0:
        buffers.append(gathered(short_from, len(pfn_array)))
    if len(buffers) <= max_iov:
        return buffers
    return [gathered(0, len(pfn_array))]


def scatter_pages(memory: memoryview, pfns: Pfns, staging: memoryview) -> None:
    """Copy page ``k`` of ``staging`` to page ``pfns[k]`` of guest memory."""
    pfn_array = _as_pfns(pfns)
    pages = _pages(memory)
    _check_remote(pfn_array, len(pages))
    need = len(pfn_array) * PAGE_SIZE
    src = np.frombuffer(staging, dtype=np.uint8)
    if src.size < need:
        raise ValueError(f"staging holds {src.size} bytes, {need} needed")
    pages[pfn_array.astype(np.intp)] = src[:need].reshape(-1, PAGE_SIZE)


def zero_pages(memory: memoryview, pfns: Pfns) -> None:
    """Fill the pages of ``pfns`` with zeros."""
    pfn_array = _as_pfns(pfns)
    pages = _pages(memory)
    _check_remote(pfn_array, len(pages))
    runs = contiguous_runs(pfn_array)
    if len(runs) * MIN_DIRECT_RUN_PAGES <= len(pfn_array):
        for first, count in runs:  # long runs: memset-speed slices
            pages[first : first + count] = 0
    else:
        pages[pfn_array.astype(np.intp)] = 0


def memory_digest(memory: memoryview, algo: DigestAlgo = DigestAlgo.BLAKE3) -> bytes:
    """Digest of all guest memory (``--verify``): BLAKE3 by default, SHA-256 for old peers.

    Both hash libraries drop the GIL while hashing; callers run this in a thread.
    """
    flat = memory.cast("B") if memory.format != "B" or memory.ndim != 1 else memory
    if algo == DigestAlgo.BLAKE3:
        return blake3.blake3(flat).digest()
    if algo != DigestAlgo.SHA256:
        raise ValueError(f"unknown digest algorithm {algo!r}")
    digest = hashlib.sha256()
    for off in range(0, len(flat), DIGEST_CHUNK_BYTES):
        digest.update(flat[off : off + DIGEST_CHUNK_BYTES])
    return digest.digest()
