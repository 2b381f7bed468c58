"""Where things live in a KVM guest's memory, and the page invariant.

Shared by the VMM (which writes the boot image) and the daemon (which checks
the invariant and reads progress counters straight from guest memory, so the
counters migrate with the pages and need no extra state).

Guest physical layout (all identity mapped)::

    0x01000  GDT
    0x02000  control page (CtlField): workload parameters and progress
    0x03000  stacks (unused by the guest, set for form's sake)
    0x10000  guest code (guest/guest.bin)
    0x20000  PML4, 0x21000 PDPT, 0x22000.. one page directory per GiB (2 MiB pages)
    then     generation table: one uint64 per data page
    then     data pages, up to the end of memory
"""

from __future__ import annotations

import dataclasses
import enum
import struct

import numpy as np
import numpy.typing as npt

from relocd.units import PAGE_SIZE

GDT_ADDR = 0x1000
CTL_ADDR = 0x2000
STACK_TOP = 0x10000
CODE_ADDR = 0x10000
CODE_MAX = 0x10000
PML4_ADDR = 0x20000
PDPT_ADDR = 0x21000
PD_ADDR = 0x22000

CTL_MAGIC = int.from_bytes(b"RLKVMCTL", "little")
LAYOUT_VERSION = 1

#: The multipliers of the page checksum; guest/guest.s has the same numbers.
K1 = 0x9E3779B97F4A7C15
K2 = 0xBF58476D1CE4E5B9

#: I/O ports the guest writes to (guest/guest.s).
PORT_BATCH = 0x10
PORT_IDLE = 0x11
PORT_AP_IDLE = 0x12

WORDS_PER_PAGE = PAGE_SIZE // 8
U64 = npt.NDArray[np.uint64]
MAX_MEMORY_GIB = 512  # one PML4 entry
_CHECK_CHUNK = 8192  # pages per vectorised comparison (4 MiB of bools)


class CtlField(enum.IntEnum):
    """uint64 slots of the control page (index, not byte offset)."""

    MAGIC = 0
    VERSION = 1
    NPAGES = 2
    DATA_START = 3
    NDATA = 4
    GENTAB = 5
    KIND = 6
    BATCH = 7
    HOT = 8
    RNG = 9
    CURSOR = 10
    TICKS = 11
    WRITTEN = 12
    INFLIGHT = 13


class WorkloadKind(enum.IntEnum):
    IDLE = 0
    UNIFORM = 1
    HOTSET = 2
    SWEEP = 3


@dataclasses.dataclass(frozen=True)
class GuestLayout:
    npages: int
    n_pd: int
    gentab_addr: int
    data_start: int  # first data pfn
    ndata: int

    @classmethod
    def for_pages(cls, npages: int) -> GuestLayout:
        gib = -(-npages * PAGE_SIZE // (1 << 30))
        if gib > MAX_MEMORY_GIB:
            raise ValueError(f"kvm guests are limited to {MAX_MEMORY_GIB} GiB")
        n_pd = max(1, gib)
        gentab_pfn = PD_ADDR // PAGE_SIZE + n_pd
        avail = npages - gentab_pfn
        # ndata data pages need ceil(ndata / 512) table pages
        ndata = avail * WORDS_PER_PAGE // (WORDS_PER_PAGE + 1)
        while ndata > 0 and ndata + -(-ndata // WORDS_PER_PAGE) > avail:
            ndata -= 1
        if ndata < 16:
            raise ValueError("guest memory too small for the kvm guest")
        gen_pages = -(-ndata // WORDS_PER_PAGE)
        return cls(
            npages=npages,
            n_pd=n_pd,
            gentab_addr=gentab_pfn * PAGE_SIZE,
            data_start=gentab_pfn + gen_pages,
            ndata=ndata,
        )


def checksum(pfn: U64, gen: U64) -> U64:
    """c(pfn, g) = ((pfn * K1) ^ g) * K2 mod 2^64, vectorised."""
    with np.errstate(over="ignore"):
        out: U64 = ((pfn * np.uint64(K1)) ^ gen) * np.uint64(K2)
    return out


def read_ctl(memory: memoryview) -> dict[str, int]:
    """The control page as a dict of field name -> value (lower-case names)."""
    raw = struct.unpack_from(f"<{len(CtlField)}Q", memory, CTL_ADDR)
    return {f.name.lower(): raw[f] for f in CtlField}


def write_boot_image(memory: memoryview, code: bytes, kind: WorkloadKind, batch: int,
                     hot_pages: int, seed: int, *, stamped: bool = False) -> GuestLayout:
    """Write GDT, page tables, control page and code into zeroed guest memory.

    ``stamped`` writes every data page at generation 1 (what a guest that
    initialises its memory at boot would leave; done here with numpy because
    the guest itself may run slowly under an emulating KVM).
    """
    npages = len(memory) // PAGE_SIZE
    lay = GuestLayout.for_pages(npages)
    if len(code) > CODE_MAX:
        raise ValueError("guest code too large")
    # GDT: null, 64-bit code (0x08), data (0x10)
    struct.pack_into("<3Q", memory, GDT_ADDR, 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF)
    # identity map with 2 MiB pages
    struct.pack_into("<Q", memory, PML4_ADDR, PDPT_ADDR | 0x3)
    for i in range(lay.n_pd):
        pd = PD_ADDR + i * PAGE_SIZE
        struct.pack_into("<Q", memory, PDPT_ADDR + 8 * i, pd | 0x3)
        base = i << 30
        entries = np.arange(512, dtype=np.uint64) * np.uint64(1 << 21) + np.uint64(base | 0x83)
        memory[pd : pd + PAGE_SIZE] = entries.tobytes()
    memory[CODE_ADDR : CODE_ADDR + len(code)] = code
    ctl = [0] * len(CtlField)
    ctl[CtlField.MAGIC] = CTL_MAGIC
    ctl[CtlField.VERSION] = LAYOUT_VERSION
    ctl[CtlField.NPAGES] = npages
    ctl[CtlField.DATA_START] = lay.data_start
    ctl[CtlField.NDATA] = lay.ndata
    ctl[CtlField.GENTAB] = lay.gentab_addr
    ctl[CtlField.KIND] = int(kind)
    ctl[CtlField.BATCH] = max(1, batch) if kind != WorkloadKind.IDLE else 0
    ctl[CtlField.HOT] = max(1, min(hot_pages, lay.ndata))
    ctl[CtlField.RNG] = seed or 0x2545F4914F6CDD1D
    if stamped:
        _stamp_all(memory, lay)
        ctl[CtlField.WRITTEN] = lay.ndata
    struct.pack_into(f"<{len(ctl)}Q", memory, CTL_ADDR, *ctl)
    return lay


def _stamp_all(memory: memoryview, lay: GuestLayout) -> None:
    words = np.frombuffer(memory, dtype=np.uint64).reshape(lay.npages, WORDS_PER_PAGE)
    pages = words[lay.data_start : lay.data_start + lay.ndata]
    pfns = np.arange(lay.data_start, lay.data_start + lay.ndata, dtype=np.uint64)
    ones = np.ones(lay.ndata, dtype=np.uint64)
    c = checksum(pfns, ones)
    pages[:, 0] = pfns
    pages[:, 1] = ones
    pages[:, 2] = c
    pages[:, WORDS_PER_PAGE - 1] = c
    np.frombuffer(memory, dtype=np.uint64, count=lay.ndata, offset=lay.gentab_addr)[:] = ones


def check_invariant(memory: memoryview) -> str | None:
    """Check every data page against the generation table; None if all hold.

    A page never written (generation 0) must be all zero; a written page must
    carry its pfn, the table's generation and the checksum in words 0, 1, 2
    and 511, and zeros between (guest/guest.s).  The page the guest was writing when it stopped (ctl.inflight) is
    skipped, and the table's sum must equal the guest's count of page writes.
    """
    if len(memory) < CTL_ADDR + PAGE_SIZE:
        return "guest memory too small"
    ctl = read_ctl(memory)
    if ctl["magic"] != CTL_MAGIC:
        return "control page missing (guest never booted or memory not copied)"
    if ctl["version"] != LAYOUT_VERSION:
        return f"control page version {ctl['version']} (expected {LAYOUT_VERSION})"
    npages = len(memory) // PAGE_SIZE
    lay = GuestLayout.for_pages(npages)
    if (ctl["npages"], ctl["data_start"], ctl["ndata"], ctl["gentab"]) != (
        npages, lay.data_start, lay.ndata, lay.gentab_addr
    ):
        return "control page layout does not match the memory size"
    words = np.frombuffer(memory, dtype=np.uint64).reshape(npages, WORDS_PER_PAGE)
    gens = np.frombuffer(memory, dtype=np.uint64, count=lay.ndata, offset=lay.gentab_addr)
    pages = words[lay.data_start : lay.data_start + lay.ndata]
    pfns = np.arange(lay.data_start, lay.data_start + lay.ndata, dtype=np.uint64)
    written = gens != 0
    expect = np.where(written, checksum(pfns, gens), np.uint64(0))
    ok = (pages[:, 0] == np.where(written, pfns, np.uint64(0))) & (pages[:, 1] == gens)
    ok &= (pages[:, 2] == expect) & (pages[:, WORDS_PER_PAGE - 1] == expect)
    for lo in range(0, lay.ndata, _CHECK_CHUNK):  # bounded temporaries
        hi = lo + _CHECK_CHUNK
        ok[lo:hi] &= ~pages[lo:hi, 3 : WORDS_PER_PAGE - 1].any(axis=1)
    inflight = ctl["inflight"]
    if inflight:
        if not lay.data_start <= inflight < lay.data_start + lay.ndata:
            return f"control page names pfn {inflight} in flight, outside the data pages"
        ok[inflight - lay.data_start] = True
    if not ok.all():
        bad = np.flatnonzero(~ok)
        first = int(bad[0])
        pfn = lay.data_start + first
        return (
            f"{bad.size} bad page(s); first pfn {pfn}: generation {int(pages[first, 1])} "
            f"in page, {int(gens[first])} in table"
        )
    total = int(gens.sum(dtype=np.uint64))
    writes = ctl["written"]
    if not (total == writes or (inflight and total == writes + 1)):
        return f"generation table sums to {total} but the guest counted {writes} page writes"
    return None
