"""Savefiles as ByteTransports: the record stream goes to and comes from a file.

``RecordChannel`` neither knows nor cares that its peer is a file.  Writing,
page payload leaves guest memory as one ``os.writev`` per batch, off the event
loop, while the file digest is computed on the digest pool; every
``WRITEBACK_STEP`` bytes the kernel is told to start writing them to disk
(``sync_file_range``), so the disk works while we copy and the final fsync
waits for the tail only, not the whole file.  Reading, small reads (record
headers, pfn lists) come out of a small readahead buffer and large ones (page
runs) go straight into guest memory with ``os.preadv``; a restore checks the
file digest meanwhile (``Verification``), from the page cache the loads fill.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import dataclasses
import enum
import os
import stat
import threading
from collections.abc import Callable, Sequence
from typing import Self, TypeVar

import blake3
import numpy as np
import numpy.typing as npt

from relocd.engine.savefile_format import (
    MAX_HEADER_SIZE,
    TRAILER_SIZE,
    ChunkedDigest,
    DigestStopped,
    FileHeader,
    Trailer,
    digest_file,
    parse_header,
    parse_trailer,
)
from relocd.engine.stream import PeerGone, RecordChannel
from relocd.errors import SaveFileError
from relocd.protocol.codec import DEFAULT_MAX_LENGTH
from relocd.protocol.records import Role
from relocd.protocol.state import Conversation
from relocd.units import PAGE_SIZE

IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
#: What a small read (a record header, a pfn list) fetches ahead.  Small on
#: purpose: what follows a pfn list is page payload, and every byte of it the
#: readahead holds is copied twice (1 MiB here cost a quarter of the payload).
READAHEAD = 64 << 10
#: Reads at least this big skip the readahead buffer and run off the loop.
DIRECT_READ = 256 << 10

#: A save asks the kernel to start writeback every this many bytes (sync_file_range).
WRITEBACK_STEP = 16 << 20
#: A restore asks the kernel to read this far ahead of the load (POSIX_FADV_WILLNEED),
#: so the disk works while the load copies and first touches guest memory.
READ_AHEAD_OF_LOAD = 32 << 20
SYNC_FILE_RANGE_WRITE = 2

_T = TypeVar("_T")


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range`` (Linux only; ctypes drops the GIL for the call)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()


def start_writeback(fd: int, offset: int, length: int) -> bool:
    """Ask the kernel to start writing ``fd``'s dirty pages in that range; False where it cannot."""
    if _sync_file_range is None:
        return False
    return _sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE) == 0


def io_error(path: str, doing: str, exc: OSError) -> SaveFileError:
    return SaveFileError(f"cannot {doing} {path}: {exc.strerror or exc}")


class WriteMode(enum.Enum):
    #: buffers stay unchanged until the digest is finished (a paused domain)
    DIRECT = "direct"
    #: guest memory may change under us: copy each write, write the copy
    COPY = "copy"
    #: copy now, write on ``flush`` (the last pages of a checkpoint, while paused)
    DEFER = "defer"


class FileWriter:
    """ByteTransport onto a savefile being written (to its temporary name)."""

    def __init__(self, fd: int, path: str, digest: ChunkedDigest) -> None:
        self.fd = fd
        self.path = path
        self.digest = digest
        self.mode = WriteMode.DIRECT
        self.offset = 0  # bytes handed to write() so far, deferred ones included
        self._deferred: list[bytes] = []
        self._inflight: asyncio.Future[None] | None = None
        self._written = 0  # bytes in the file (the writing thread's count)
        self._kicked = 0  # writeback asked for up to here
        self._writeback = True  # off once sync_file_range refuses (another OS, a file system without it)

    async def read_exactly(self, n: int) -> bytes:
        raise PeerGone("a savefile being written is not read")

    async def read_into(self, view: memoryview) -> None:
        raise PeerGone("a savefile being written is not read")

    async def write(self, buffers: Sequence[bytes | memoryview]) -> None:
        n = sum(memoryview(b).nbytes for b in buffers)
        self.offset += n
        if self.mode is WriteMode.DIRECT:
            await self._write_off_loop(list(buffers))
            return
        copy = b"".join(buffers)
        if self.mode is WriteMode.DEFER:
            self._deferred.append(copy)
        else:
            await self._write_off_loop([copy])

    async def flush(self) -> None:
        """Write what DEFER mode held back."""
        pending, self._deferred = self._deferred, []
        if pending:
            await self._write_off_loop(pending)

    async def _write_off_loop(self, buffers: Sequence[bytes | memoryview]) -> None:
        # Shielded: a cancelled save must not close the fd under a running writev.
        self._inflight = asyncio.ensure_future(asyncio.to_thread(self._write_sync, buffers))
        await asyncio.shield(self._inflight)

    async def settle(self) -> None:
        """Wait for a write still running in its thread (after a failure or a cancel)."""
        if self._inflight is not None and not self._inflight.done():
            try:
                await asyncio.wait([self._inflight])
            except BaseException:
                pass

    def _write_sync(self, buffers: Sequence[bytes | memoryview]) -> None:
        views = [memoryview(b).cast("B") for b in buffers]
        total = sum(len(v) for v in views)
        i = 0
        try:
            while i < len(views):
                written = os.writev(self.fd, views[i : i + IOV_MAX])
                while written and i < len(views):
                    if written >= len(views[i]):
                        written -= len(views[i])
                        i += 1
                    else:
                        views[i] = views[i][written:]
                        written = 0
                while i < len(views) and not len(views[i]):
                    i += 1
        except OSError as exc:
            raise io_error(self.path, "write", exc) from None
        self._written += total
        if self._writeback and self._written - self._kicked >= WRITEBACK_STEP:
            # The disk starts on these bytes now instead of at the fsync; the
            # page cache keeps them (a restore or a checkpoint's image digest reads them).
            self._writeback = start_writeback(self.fd, self._kicked, self._written - self._kicked)
            self._kicked = self._written
        self.digest.update(buffers)

    async def close(self) -> None:
        pass  # the owner of the fd closes it


class FileReader:
    """ByteTransport over the record stream of an open savefile (``start`` to ``end``)."""

    def __init__(self, fd: int, path: str, start: int, end: int) -> None:
        self.fd = fd
        self.path = path
        self.pos = start
        self.end = end
        self._buf = b""
        self._buf_at = start  # file offset of _buf[0]
        self._advised = start  # WILLNEED asked for up to here

    def _need(self, n: int) -> None:
        if self.pos + n > self.end:
            raise PeerGone(f"{self.path}: the record stream ends in the middle of a record")

    def _pread(self, n: int, at: int) -> bytes:
        try:
            data = os.pread(self.fd, n, at)
        except OSError as exc:
            raise io_error(self.path, "read", exc) from None
        if len(data) != n:
            raise PeerGone(f"{self.path}: file shrank while being read")
        return data

    async def read_exactly(self, n: int) -> bytes:
        self._need(n)
        if n >= DIRECT_READ:
            buf = bytearray(n)
            await self.read_into(memoryview(buf))
            return bytes(buf)
        lo = self.pos - self._buf_at
        if lo + n > len(self._buf):
            size = min(max(n, READAHEAD), self.end - self.pos)
            self._buf, self._buf_at, lo = self._pread(size, self.pos), self.pos, 0
        self.pos += n
        return self._buf[lo : lo + n]

    async def read_into(self, view: memoryview) -> None:
        view = view.cast("B")
        n = len(view)
        self._need(n)
        got = 0
        lo = self.pos - self._buf_at
        if 0 <= lo < len(self._buf):  # what the readahead already holds
            got = min(n, len(self._buf) - lo)
            view[:got] = self._buf[lo : lo + got]
        if got < n:
            rest = view[got:]
            if len(rest) >= DIRECT_READ:
                await asyncio.to_thread(self._preadv, rest, self.pos + got)
            else:
                self._preadv(rest, self.pos + got)
        self.pos += n

    def _preadv(self, view: memoryview, at: int) -> None:
        if at + len(view) + READ_AHEAD_OF_LOAD // 2 > self._advised:
            # (in the loading thread: WILLNEED waits while the reads are submitted)
            upto = min(self.end, at + len(view) + READ_AHEAD_OF_LOAD)
            if upto > self._advised:
                try:
                    os.posix_fadvise(self.fd, self._advised, upto - self._advised, os.POSIX_FADV_WILLNEED)
                except (OSError, AttributeError):
                    pass
                self._advised = upto
        done = 0
        try:
            while done < len(view):
                k = os.preadv(self.fd, [view[done:]], at + done)
                if k == 0:
                    raise PeerGone(f"{self.path}: file shrank while being read")
                done += k
        except OSError as exc:
            raise io_error(self.path, "read", exc) from None

    async def write(self, buffers: Sequence[bytes | memoryview]) -> None:
        raise SaveFileError("a savefile is read-only while restoring")

    async def close(self) -> None:
        pass


@dataclasses.dataclass
class OpenFile:
    """A file open for reading: one descriptor from the first check to the last read."""

    path: str
    fd: int
    size: int

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_checked(path: str, check: Callable[[int, os.stat_result], _T]) -> tuple[int, os.stat_result, _T]:
    """Open ``path`` read-only and run ``check(fd, stat)`` on it: (fd, stat, what check returned).

    The descriptor is closed if anything fails; an OSError becomes the
    one-line "cannot read PATH" error.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise io_error(path, "open", exc) from None
    try:
        st = os.fstat(fd)
        return fd, st, check(fd, st)
    except OSError as exc:
        os.close(fd)
        raise io_error(path, "read", exc) from None
    except BaseException:
        os.close(fd)
        raise


@dataclasses.dataclass
class OpenSavefile(OpenFile):
    """A savefile whose header and trailer parsed; ``verify`` checks the digest.

    One descriptor serves both passes (verify, then restore), so a file
    renamed over this one in between cannot slip in unverified bytes.
    """

    header: FileHeader
    trailer: Trailer

    @classmethod
    def open(cls, path: str) -> OpenSavefile:
        def check(fd: int, st: os.stat_result) -> tuple[FileHeader, Trailer]:
            if not stat.S_ISREG(st.st_mode):
                raise SaveFileError(f"{path}: not a regular file")
            head = os.pread(fd, min(st.st_size, MAX_HEADER_SIZE), 0)
            header = parse_header(path, head)
            if st.st_size < header.header_len + TRAILER_SIZE:
                raise SaveFileError(f"{path}: truncated savefile (no record stream or trailer)")
            return header, parse_trailer(path, os.pread(fd, TRAILER_SIZE, st.st_size - TRAILER_SIZE), st.st_size)

        fd, st, (header, trailer) = open_checked(path, check)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # a larger readahead window
        except (OSError, AttributeError):
            pass
        return cls(path, fd, st.st_size, header, trailer)

    def verify(self, stop: threading.Event | None = None) -> None:
        """Full read pass: the digest in the trailer must match every byte before it."""
        try:
            digest = digest_file(self.fd, self.trailer.stream_end, algo=self.trailer.algo, stop=stop)
        except OSError as exc:
            raise io_error(self.path, "read", exc) from None
        if digest != self.trailer.digest:
            raise SaveFileError(f"{self.path}: corrupted savefile (digest mismatch)")

    def channel(self) -> RecordChannel:
        """The record stream, read as a target reads a migration."""
        reader = FileReader(self.fd, self.path, self.header.header_len, self.trailer.stream_end)
        return RecordChannel(
            reader,
            Conversation(Role.TARGET, savefile=True),
            max_frame=DEFAULT_MAX_LENGTH,
            npages_limit=self.header.memory_bytes // PAGE_SIZE,
        )

    @property
    def records_left(self) -> int:
        return self.trailer.stream_end - self.header.header_len


class Verification:
    """A savefile's digest pass, run in threads while its records load.

    A restore starts it before it builds anything and awaits ``check``
    before the domain may run (docs/savefile.md, Reading safely): the load
    and the hashing share one pass over the file, the hashing reading what
    the load just brought into the page cache.  ``stop`` ends it early (the
    restore failed for another reason); the owner must await it before
    closing the file.
    """

    def __init__(self, opened: OpenSavefile) -> None:
        self._stop = threading.Event()
        self._future: asyncio.Future[None] = asyncio.ensure_future(asyncio.to_thread(opened.verify, self._stop))

    async def check(self) -> None:
        """Wait for the digest; SaveFileError if it does not match (or the file could not be read)."""
        await asyncio.shield(self._future)

    async def problem(self) -> SaveFileError | None:
        """What ``check`` would raise, or None: the verdict on a file whose load failed."""
        try:
            await self.check()
        except SaveFileError as exc:
            return exc
        return None

    async def stop(self) -> None:
        """Stop hashing (if still running) and wait until no thread reads the file."""
        self._stop.set()
        await asyncio.wait([self._future])
        if not self._future.cancelled():
            exc = self._future.exception()
            if exc is not None and not isinstance(exc, SaveFileError | DigestStopped):
                raise exc


def image_digest(fd: int, locations: npt.NDArray[np.int64]) -> bytes:
    """BLAKE3 of the memory image a savefile describes, read back from the file.

    ``locations[pfn]`` is the file offset of the page's last copy, -1 for a
    zero page.  This is the DIGEST record of a checkpoint, whose domain kept
    running: its memory is no longer the image, the file is.
    """
    h = blake3.blake3()
    n = len(locations)
    if n == 0:
        return h.digest()
    is_zero = locations < 0
    follows = np.diff(locations) == PAGE_SIZE
    same_run = np.where(is_zero[1:], is_zero[:-1], follows & ~is_zero[:-1])
    breaks = np.flatnonzero(~same_run) + 1
    starts = np.concatenate(([0], breaks)).tolist()
    ends = np.concatenate((breaks, [n])).tolist()
    zero = bytes(READAHEAD)
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    for s, e in zip(starts, ends):
        left = (e - s) * PAGE_SIZE
        if is_zero[s]:
            while left:
                k = min(left, len(zero))
                h.update(zero[:k])
                left -= k
            continue
        at = int(locations[s])
        while left:
            k = min(left, len(buf))
            got = os.preadv(fd, [view[:k]], at)
            if got != k:
                raise SaveFileError("savefile shrank while its image digest was computed")
            h.update(view[:k])
            at += k
            left -= k
    return h.digest()
