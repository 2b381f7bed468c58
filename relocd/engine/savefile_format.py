"""The savefile's own framing: file header, trailer and the whole-file digest.

A savefile is a file header, then the savefile record stream (CONFIG ...
COMMIT, encoded by ``protocol.codec``), then a fixed 64-byte trailer whose
digest covers every byte before it.  ``docs/savefile.md`` specifies the bytes;
``tests/unit/test_savefile.py`` checks that the doc and this module agree.

The digest is BLAKE3 over the BLAKE3 of each 4 MiB chunk (a two-level hash
list), so chunks hash on several cores at once (the hash drops the GIL).  BLAKE3
hashes about five times faster than SHA-256 on one core here, which is what
lets a save or a restore's verify pass keep up with the disk.  Files written
with algorithm 1 (the same list with SHA-256) are still read.

The format version is the file's, not the program's: a reader refuses a newer
major version and skips header bytes that a newer minor version appended.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import datetime
import hashlib
import mmap
import os
import struct
import threading
import uuid as uuidlib
import zlib

import blake3
from collections.abc import Callable, Sequence
from typing import Any, Final

from relocd.errors import SaveFileError
from relocd.units import PAGE_SIZE

MAGIC: Final = b"\x89RSAV\r\n\x1a"
FORMAT_MAJOR: Final = 1
FORMAT_MINOR: Final = 0

TRAILER_MAGIC: Final = b"\x89RLCDEND"
TRAILER_END: Final = b"END\n"
TRAILER_SIZE: Final = 64

#: flags (header offset 16)
FLAG_CHECKPOINT: Final = 1 << 0

#: digest algorithm byte (trailer offset 16)
DIGEST_SHA256_CHUNKED: Final = 1
DIGEST_BLAKE3_CHUNKED: Final = 2
#: algorithm byte -> hash constructor; files are written with BLAKE3
_HASHES: Final[dict[int, Callable[..., Any]]] = {
    DIGEST_SHA256_CHUNKED: hashlib.sha256,
    DIGEST_BLAKE3_CHUNKED: blake3.blake3,
}
CHUNK_LOG2: Final = 22
CHUNK_SIZE: Final = 1 << CHUNK_LOG2  # 4 MiB

#: magic major minor header_len flags page_size created_ns memory_bytes uuid vcpus
#: name_len driver_len writer_len reserved
_HEADER_FIXED: Final = struct.Struct("!8sHHIIIQQ16sIBBBB")
HEADER_FIXED_SIZE: Final = _HEADER_FIXED.size
_CRC: Final = struct.Struct("!I")
#: magic stream_end algo chunk_log2 reserved(2) reserved(4) digest crc end
_TRAILER: Final = struct.Struct("!8sQBB2s4s32sI4s")
_TOTAL: Final = struct.Struct("!Q")
MAX_TEXT: Final = 64  # each of name, driver, writer version
MAX_HEADER_SIZE: Final = 64 << 10  # a newer minor version may append, within reason

assert HEADER_FIXED_SIZE == 64 and _TRAILER.size == TRAILER_SIZE


@dataclasses.dataclass(frozen=True)
class FileHeader:
    """What `relocd inspect` shows without reading the record stream."""

    name: str
    uuid: str
    memory_bytes: int
    vcpus: int
    driver: str
    writer: str  # the relocd version that wrote the file
    created_ns: int
    checkpoint: bool = False
    major: int = FORMAT_MAJOR
    minor: int = FORMAT_MINOR
    page_size: int = PAGE_SIZE
    header_len: int = 0  # filled in by parse_header / pack

    def pack(self) -> bytes:
        texts = [_ascii("name", self.name), _ascii("driver", self.driver), _ascii("writer", self.writer)]
        header_len = HEADER_FIXED_SIZE + sum(len(t) for t in texts) + _CRC.size
        fixed = _HEADER_FIXED.pack(
            MAGIC,
            self.major,
            self.minor,
            header_len,
            FLAG_CHECKPOINT if self.checkpoint else 0,
            self.page_size,
            self.created_ns,
            self.memory_bytes,
            uuidlib.UUID(self.uuid).bytes,
            self.vcpus,
            *(len(t) for t in texts),
            0,
        )
        body = fixed + b"".join(texts)
        return body + _CRC.pack(zlib.crc32(body))

    @property
    def created(self) -> str:
        stamp = datetime.datetime.fromtimestamp(self.created_ns / 1e9, tz=datetime.timezone.utc)
        return stamp.isoformat(timespec="seconds")

    def to_json(self) -> dict[str, object]:
        return {
            "format": f"{self.major}.{self.minor}",
            "writer": self.writer,
            "name": self.name,
            "uuid": self.uuid,
            "memory_bytes": self.memory_bytes,
            "memory_mib": self.memory_bytes >> 20,
            "vcpus": self.vcpus,
            "driver": self.driver,
            "checkpoint": self.checkpoint,
            "created": self.created,
            "created_ns": self.created_ns,
        }


def _ascii(what: str, text: str) -> bytes:
    raw = text.encode("ascii", errors="replace")
    if not 1 <= len(raw) <= MAX_TEXT:
        raise ValueError(f"savefile header {what} must be 1..{MAX_TEXT} ASCII bytes")
    return raw


def _text(path: str, what: str, raw: bytes) -> str:
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise SaveFileError(f"{path}: corrupted header ({what} is not ASCII)") from None
    if not text.isprintable():
        raise SaveFileError(f"{path}: corrupted header ({what} has control characters)")
    return text


def check_magic(path: str, head: bytes) -> None:
    """Refuse files that are not savefiles, with a hint at what they might be."""
    if head[: len(MAGIC)] == MAGIC:
        return
    if len(head) < len(MAGIC) and MAGIC.startswith(head):
        raise SaveFileError(f"{path}: truncated savefile ({len(head)} bytes)")
    if head[:5] == MAGIC[:5]:
        raise SaveFileError(f"{path}: savefile mangled (text-mode transfer or line-ending conversion?)")
    if head[:5] == b"\x89RLCD":
        raise SaveFileError(f"{path}: a relocd migration stream, not a savefile")
    raise SaveFileError(f"{path}: not a relocd savefile (starts with {head[:8].hex()})")


def parse_header(path: str, head: bytes) -> FileHeader:
    """Parse the header from the file's first bytes (at least ``header_len`` of them)."""
    check_magic(path, head)
    if len(head) < 12:
        raise SaveFileError(f"{path}: truncated savefile ({len(head)} bytes)")
    major, minor = struct.unpack_from("!HH", head, 8)
    if major != FORMAT_MAJOR:
        newer = "a newer" if major > FORMAT_MAJOR else "an older"
        raise SaveFileError(
            f"{path}: savefile format {major}.{minor} is {newer} major version; "
            f"this relocd reads format {FORMAT_MAJOR}.x"
        )
    if len(head) < HEADER_FIXED_SIZE:
        raise SaveFileError(f"{path}: truncated savefile ({len(head)} bytes)")
    (_, _, _, header_len, flags, page_size, created_ns, memory_bytes, raw_uuid, vcpus,
     name_len, driver_len, writer_len, reserved) = _HEADER_FIXED.unpack_from(head)  # fmt: skip
    texts_end = HEADER_FIXED_SIZE + name_len + driver_len + writer_len
    if not texts_end + _CRC.size <= header_len <= MAX_HEADER_SIZE:
        raise SaveFileError(f"{path}: corrupted header (length {header_len})")
    if len(head) < header_len:
        raise SaveFileError(f"{path}: truncated savefile (ends inside the header)")
    (crc,) = _CRC.unpack_from(head, header_len - _CRC.size)
    if zlib.crc32(head[: header_len - _CRC.size]) != crc:
        raise SaveFileError(f"{path}: corrupted header (CRC mismatch)")
    if reserved or minor <= FORMAT_MINOR and texts_end + _CRC.size != header_len:
        raise SaveFileError(f"{path}: corrupted header (reserved bytes set)")
    if page_size != PAGE_SIZE:
        raise SaveFileError(f"{path}: page size {page_size}, this host uses {PAGE_SIZE}")
    if memory_bytes == 0 or memory_bytes % PAGE_SIZE:
        raise SaveFileError(f"{path}: corrupted header (memory size {memory_bytes})")
    at = HEADER_FIXED_SIZE
    fields = []
    for what, n in (("name", name_len), ("driver", driver_len), ("writer", writer_len)):
        fields.append(_text(path, what, head[at : at + n]))
        at += n
    return FileHeader(
        name=fields[0],
        uuid=str(uuidlib.UUID(bytes=raw_uuid)),
        memory_bytes=memory_bytes,
        vcpus=vcpus,
        driver=fields[1],
        writer=fields[2],
        created_ns=created_ns,
        checkpoint=bool(flags & FLAG_CHECKPOINT),
        major=major,
        minor=minor,
        page_size=page_size,
        header_len=header_len,
    )


# -- trailer ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Trailer:
    stream_end: int  # offset of the trailer: the bytes the digest covers
    digest: bytes
    algo: int = DIGEST_BLAKE3_CHUNKED
    chunk_log2: int = CHUNK_LOG2

    def pack(self) -> bytes:
        body = _TRAILER.pack(
            TRAILER_MAGIC, self.stream_end, self.algo, self.chunk_log2, bytes(2), bytes(4),
            self.digest, 0, TRAILER_END,
        )  # fmt: skip
        crc = zlib.crc32(body[:56])
        return body[:56] + _CRC.pack(crc) + TRAILER_END


def parse_trailer(path: str, raw: bytes, file_size: int) -> Trailer:
    if len(raw) != TRAILER_SIZE:
        raise SaveFileError(f"{path}: truncated savefile (no trailer)")
    magic, stream_end, algo, chunk_log2, res2, res4, digest, crc, end = _TRAILER.unpack(raw)
    if magic != TRAILER_MAGIC or end != TRAILER_END:
        raise SaveFileError(f"{path}: truncated or incomplete savefile (no trailer at the end)")
    if zlib.crc32(raw[:56]) != crc:
        raise SaveFileError(f"{path}: corrupted trailer (CRC mismatch)")
    if stream_end != file_size - TRAILER_SIZE:
        raise SaveFileError(
            f"{path}: truncated or padded savefile ({file_size} bytes, the trailer says "
            f"{stream_end + TRAILER_SIZE})"
        )
    if algo not in _HASHES or chunk_log2 != CHUNK_LOG2 or any(res2 + res4):
        raise SaveFileError(f"{path}: unknown digest algorithm {algo}/{chunk_log2}")
    return Trailer(stream_end, digest, algo, chunk_log2)


# -- the digest -----------------------------------------------------------------

_pool_lock = threading.Lock()
_pool: cf.ThreadPoolExecutor | None = None


def digest_pool() -> cf.ThreadPoolExecutor:
    """Threads shared by every save and verify (hashlib hashes without the GIL)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            workers = max(2, min(8, os.cpu_count() or 2))
            _pool = cf.ThreadPoolExecutor(workers, thread_name_prefix="relocd-digest")
        return _pool


def _hash_pieces(pieces: Sequence[bytes | memoryview], algo: int = DIGEST_BLAKE3_CHUNKED) -> bytes:
    h = _HASHES[algo]()
    for piece in pieces:
        h.update(piece)
    return bytes(h.digest())


def combine(total: int, chunk_digests: Sequence[bytes], algo: int = DIGEST_BLAKE3_CHUNKED) -> bytes:
    """The file digest: the hash of the byte count and every chunk's hash, in order."""
    top = _HASHES[algo](_TOTAL.pack(total))
    for d in chunk_digests:
        top.update(d)
    return bytes(top.digest())


def simple_digest(data: bytes | memoryview, algo: int = DIGEST_BLAKE3_CHUNKED) -> bytes:
    """The file digest of a buffer, in one thread (tests, tiny files)."""
    view = memoryview(data).cast("B")
    chunks = [_HASHES[algo](view[i : i + CHUNK_SIZE]).digest() for i in range(0, len(view), CHUNK_SIZE)]
    return combine(len(view), chunks, algo)


class ChunkedDigest:
    """The file digest, fed in write order; full chunks hash on the pool meanwhile.

    Buffers handed to ``update`` are kept (not copied) until their chunk is
    hashed: the caller must not change them before ``finish`` returns.
    """

    def __init__(self, pool: cf.Executor | None = None, max_pending: int = 16) -> None:
        self._pool = pool or digest_pool()
        self._max_pending = max_pending
        self._futures: list[cf.Future[bytes]] = []
        self._done: list[bytes] = []
        self._pieces: list[bytes | memoryview] = []
        self._fill = 0
        self.total = 0

    def update(self, buffers: Sequence[bytes | memoryview]) -> None:
        for buf in buffers:
            view = memoryview(buf).cast("B") if isinstance(buf, memoryview) else memoryview(buf)
            while len(view):
                take = min(len(view), CHUNK_SIZE - self._fill)
                self._pieces.append(view[:take])
                self._fill += take
                self.total += take
                view = view[take:]
                if self._fill == CHUNK_SIZE:
                    self._submit()

    def _submit(self) -> None:
        pieces, self._pieces, self._fill = self._pieces, [], 0
        self._futures.append(self._pool.submit(_hash_pieces, pieces))
        while len(self._futures) > self._max_pending:
            self._done.append(self._futures.pop(0).result())

    def drain(self) -> None:
        """Wait until no buffer handed in so far is still referenced (copies a partial chunk)."""
        if len(self._pieces) > 1 or any(isinstance(p, memoryview) for p in self._pieces):
            self._pieces = [b"".join(self._pieces)]
        for fut in self._futures:
            self._done.append(fut.result())
        self._futures = []

    def finish(self) -> bytes:
        self.drain()
        if self._fill:
            self._done.append(_hash_pieces(self._pieces))
            self._pieces, self._fill = [], 0
        return combine(self.total, self._done)

    def cancel(self) -> None:
        for fut in self._futures:
            fut.cancel()
        cf.wait(self._futures)
        self._futures, self._pieces = [], []


class DigestStopped(Exception):
    """``digest_file`` was told to stop (the restore it checked for failed otherwise)."""


def digest_file(
    fd: int,
    length: int,
    pool: cf.Executor | None = None,
    algo: int = DIGEST_BLAKE3_CHUNKED,
    stop: threading.Event | None = None,
) -> bytes:
    """The file digest of the first ``length`` bytes of ``fd``, read through mmap.

    Chunks hash in parallel straight from the page cache; nothing is copied.
    ``stop`` set makes it give up between chunks (DigestStopped).
    """
    pool = pool or digest_pool()
    if length == 0:
        return combine(0, [], algo)
    mm = mmap.mmap(fd, length, access=mmap.ACCESS_READ)
    try:
        mm.madvise(mmap.MADV_SEQUENTIAL)
        base = memoryview(mm)
        try:
            window = 2 * getattr(pool, "_max_workers", 4)
            futures: list[cf.Future[bytes]] = []
            digests: list[bytes] = []
            try:
                for off in range(0, length, CHUNK_SIZE):
                    if stop is not None and stop.is_set():
                        raise DigestStopped()
                    futures.append(pool.submit(_hash_view, base, off, min(off + CHUNK_SIZE, length), algo))
                    if len(futures) >= window:
                        digests.append(futures.pop(0).result())
                digests.extend(f.result() for f in futures)
            finally:
                cf.wait(futures)  # no thread may still look at the mapping
        finally:
            base.release()
    finally:
        mm.close()
    return combine(length, digests, algo)


def _hash_view(base: memoryview, start: int, end: int, algo: int = DIGEST_BLAKE3_CHUNKED) -> bytes:
    with base[start:end] as view:
        return bytes(_HASHES[algo](view).digest())
