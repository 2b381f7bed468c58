"""The small shared-memory area between a sim domain process and the daemon.

It is a second memfd, mapped by both sides, so that progress counters and
dirty-bitmap snapshots never travel over the control socket:

* offset 0: a header of little-endian uint64 words (magic, layout, counters,
  flags), written only by the domain process;
* offset ``BITMAP_OFFSET``: the dirty-bitmap snapshot, written by the domain
  process on fetch-and-clear and read by the daemon right after the reply.
"""

from __future__ import annotations

import dataclasses
import mmap
import struct

from relocd.units import PAGE_SIZE

MAGIC = 0x5441_5453_4D49_5352  # "RSIMSTAT" little-endian
LAYOUT = 1
HEADER = struct.Struct("<8Q")
BITMAP_OFFSET = PAGE_SIZE


def bitmap_words(npages: int) -> int:
    """uint64 words in a dirty bitmap of ``npages`` pages."""
    return (npages + 63) // 64


def area_size(npages: int) -> int:
    """Bytes of the status memfd for a guest of ``npages`` pages (page-rounded)."""
    raw = BITMAP_OFFSET + bitmap_words(npages) * 8
    return (raw + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE


@dataclasses.dataclass(frozen=True)
class StatusHeader:
    """Progress of the guest as the daemon reads it."""

    ticks: int
    pages_written: int
    running: bool
    logging: bool
    sweep_pos: int
    npages: int

    def write(self, area: mmap.mmap) -> None:
        HEADER.pack_into(
            area,
            0,
            MAGIC,
            LAYOUT,
            self.ticks,
            self.pages_written,
            int(self.running),
            int(self.logging),
            self.sweep_pos,
            self.npages,
        )

    @classmethod
    def read(cls, area: mmap.mmap) -> StatusHeader:
        magic, layout, ticks, written, running, logging, sweep_pos, npages = HEADER.unpack_from(area, 0)
        if magic != MAGIC or layout != LAYOUT:
            raise ValueError(f"status area has magic {magic:#x} layout {layout}, expected {MAGIC:#x} {LAYOUT}")
        return cls(ticks, written, bool(running), bool(logging), sweep_pos, npages)
