"""Record framing: preamble, the 12-byte header, CRCs, and a streaming decoder.

Sans-IO: functions take and return bytes.  The transport reads a header,
calls ``parse_header`` (which enforces the frame limit before any body is
read), then reads exactly the body (or, for PAGES, the descriptor) and calls
``decode_body`` / ``decode_pages``.  ``FrameDecoder`` does the same over
arbitrary chunks of bytes, for tests, fuzzing and files.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Final

from relocd.errors import ProtocolError, Reason
from relocd.protocol.records import (
    RECORD_CLASSES,
    PagesHeader,
    Record,
    RecordType,
)
from relocd.units import PAGE_SIZE

#: Starts each direction of a stream; PNG-style, so text-mode transfers and
#: line-ending conversions are caught on the first 8 bytes.
PREAMBLE: Final = b"\x89RLCD\r\n\x1a"
HEADER_SIZE: Final = 12
PAGES_FIXED_SIZE: Final = 16
#: A sensible frame limit for a relocation connection (the server may pick another).
DEFAULT_MAX_LENGTH: Final = 64 * 1024 * 1024
MAX_WIRE_LENGTH: Final = 0xFFFFFFFF

_HEADER = struct.Struct("!BBHII")  # type flags reserved length crc
_CRC_COVERED = struct.Struct("!BBHI")  # header bytes 0..7
_PAGES_FIXED = struct.Struct("!IIII")  # round n_data n_zero reserved

assert _HEADER.size == HEADER_SIZE and _PAGES_FIXED.size == PAGES_FIXED_SIZE


@dataclass(frozen=True, slots=True)
class RecordHeader:
    """A parsed, validated record header."""

    type: RecordType
    flags: int
    length: int  # body length; for PAGES including the page payload
    crc: int

    def covered_prefix(self) -> bytes:
        """Header bytes 0..7, the start of what the CRC covers."""
        return _CRC_COVERED.pack(self.type, self.flags, 0, self.length)


def _crc(prefix: bytes, body: bytes | bytearray | memoryview) -> int:
    return zlib.crc32(body, zlib.crc32(prefix))


def _frame(rtype: RecordType, length: int, covered: bytes) -> bytes:
    prefix = _CRC_COVERED.pack(rtype, 0, 0, length)
    return prefix + struct.pack("!I", _crc(prefix, covered))


def encode(record: Record) -> bytes:
    """Header and body of any record but PAGES (see ``encode_pages_header``)."""
    if isinstance(record, PagesHeader):
        raise ProtocolError("PAGES goes through encode_pages_header()", remote=False)
    rtype = getattr(record, "TYPE", None)
    cls = RECORD_CLASSES.get(rtype) if isinstance(rtype, RecordType) else None
    if cls is None or not isinstance(record, cls):
        raise ProtocolError(f"not a wire record: {type(record).__name__}", remote=False)
    try:
        body = record.serialize_body()
    except (struct.error, TypeError, ValueError, OverflowError) as exc:
        name = record.TYPE.name
        raise ProtocolError(f"cannot send {name}: {exc}", remote=False) from None
    if len(body) < cls.MIN_BODY or (cls.MAX_BODY is not None and len(body) > cls.MAX_BODY):
        raise ProtocolError(
            f"cannot send {record.TYPE.name}: body of {len(body)} bytes", remote=False
        )
    return _frame(record.TYPE, len(body), body) + body


def encode_pages_header(round: int, data_pfns: object, zero_pfns: object) -> bytes:
    """Header, fixed part and pfn arrays of a PAGES record.

    The header's length already counts the ``len(data_pfns) * PAGE_SIZE``
    payload bytes the caller sends right after, in ``data_pfns`` order.
    """
    pages = PagesHeader(round, data_pfns, zero_pfns)  # type: ignore[arg-type]
    descriptor = pages.serialize_body()
    n_data = _PAGES_FIXED.unpack_from(descriptor)[1]
    length = len(descriptor) + n_data * PAGE_SIZE
    if length > MAX_WIRE_LENGTH:
        raise ProtocolError(
            f"cannot send PAGES: {length} bytes do not fit one record",
            remote=False,
            reason=Reason.LIMIT,
        )
    return _frame(RecordType.PAGES, length, descriptor) + descriptor


def check_preamble(buf: bytes | bytearray | memoryview) -> None:
    """Raise ProtocolError unless ``buf`` starts with the 8-byte preamble."""
    head = bytes(buf[: len(PREAMBLE)])
    if head == PREAMBLE:
        return
    if len(head) < len(PREAMBLE) and PREAMBLE.startswith(head):
        raise ProtocolError(f"stream ended after {len(head)} bytes of the preamble")
    if head[:1] == b"(":
        raise ProtocolError("peer speaks xend's sxp relocation protocol, not relocd")
    if head[:5] == PREAMBLE[:5]:
        raise ProtocolError("preamble mangled (text-mode transfer or line-ending conversion?)")
    raise ProtocolError(f"not a relocd stream (starts with {head.hex()})")


def parse_header(buf: bytes | bytearray | memoryview, max_length: int) -> RecordHeader:
    """Parse and validate a 12-byte header before any of the body is read."""
    if len(buf) < HEADER_SIZE:
        raise ProtocolError(f"record header truncated at {len(buf)} bytes")
    rtype, flags, reserved, length, crc = _HEADER.unpack_from(buf)
    try:
        cls = RECORD_CLASSES[RecordType(rtype)]
    except ValueError:
        raise ProtocolError(f"unknown record type 0x{rtype:02x}") from None
    name = cls.TYPE.name
    if flags:
        raise ProtocolError(f"{name}: flags 0x{flags:02x} are not zero")
    if reserved:
        raise ProtocolError(f"{name}: reserved header field is not zero")
    if length > max_length:
        raise ProtocolError(
            f"{name}: record of {length} bytes exceeds the limit of {max_length}",
            reason=Reason.LIMIT,
        )
    if cls.MAX_BODY is not None and length > cls.MAX_BODY:
        raise ProtocolError(
            f"{name}: body of {length} bytes, at most {cls.MAX_BODY} allowed",
            reason=Reason.LIMIT,
        )
    if length < cls.MIN_BODY:
        raise ProtocolError(f"{name}: body of {length} bytes, at least {cls.MIN_BODY} needed")
    return RecordHeader(cls.TYPE, flags, length, crc)


def pages_descriptor_size(header: RecordHeader, fixed: bytes | bytearray | memoryview) -> int:
    """Bytes of fixed part + pfn arrays, checked against ``header.length``."""
    if header.type != RecordType.PAGES:
        raise ProtocolError(f"{header.type.name} is not a PAGES record", remote=False)
    if len(fixed) < PAGES_FIXED_SIZE:
        raise ProtocolError(f"PAGES fixed part truncated at {len(fixed)} bytes")
    _, n_data, n_zero, reserved = _PAGES_FIXED.unpack_from(fixed)
    if reserved:
        raise ProtocolError("PAGES: reserved field is not zero")
    descriptor: int = PAGES_FIXED_SIZE + 8 * (n_data + n_zero)
    if descriptor + n_data * PAGE_SIZE != header.length:
        raise ProtocolError(
            f"PAGES: {n_data} data + {n_zero} zero pages do not add up to "
            f"a record of {header.length} bytes"
        )
    return descriptor


def decode_pages(
    header: RecordHeader,
    descriptor: bytes | bytearray | memoryview,
    npages_limit: int | None = None,
) -> PagesHeader:
    """Check and parse a PAGES descriptor; pfns must be below ``npages_limit``."""
    size = pages_descriptor_size(header, descriptor)
    if len(descriptor) != size:
        raise ProtocolError(f"PAGES descriptor is {len(descriptor)} bytes, expected {size}")
    if _crc(header.covered_prefix(), descriptor) != header.crc:
        raise ProtocolError("PAGES: CRC mismatch")
    pages = PagesHeader.parse_body(memoryview(descriptor))
    if npages_limit is not None:
        for name, pfns in (("data", pages.data_pfns), ("zero", pages.zero_pfns)):
            # Strictly increasing, so the last pfn is the largest.
            if len(pfns) and int(pfns[-1]) >= npages_limit:
                raise ProtocolError(
                    f"PAGES: {name} pfn {int(pfns[-1])} beyond the domain's "
                    f"{npages_limit} pages"
                )
    return pages


def decode_body(header: RecordHeader, body: bytes | bytearray | memoryview) -> Record:
    """Check the CRC and parse the body of any record but PAGES."""
    if header.type == RecordType.PAGES:
        raise ProtocolError("PAGES goes through decode_pages()", remote=False)
    if len(body) != header.length:
        raise ProtocolError(
            f"{header.type.name}: body is {len(body)} bytes, header says {header.length}"
        )
    if _crc(header.covered_prefix(), body) != header.crc:
        raise ProtocolError(f"{header.type.name}: CRC mismatch")
    cls = RECORD_CLASSES[header.type]
    try:
        return cls.parse_body(memoryview(body))
    except (struct.error, ValueError, IndexError, OverflowError) as exc:  # belt and braces
        raise ProtocolError(f"{header.type.name}: malformed body ({exc})") from None


class NeedData:
    """``next_event()``: feed more bytes first."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


class EndOfStream:
    """``next_event()``: the stream ended cleanly between records."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "END_OF_STREAM"


NEED_DATA: Final = NeedData()
END_OF_STREAM: Final = EndOfStream()


@dataclass(frozen=True, slots=True)
class Pages:
    """A whole PAGES batch: descriptor and payload (``FrameDecoder`` only)."""

    header: PagesHeader
    payload: bytes


Event = Record | Pages | NeedData | EndOfStream


class FrameDecoder:
    """Bytes in, records out, h11 style: ``receive_data`` then ``next_event``.

    Each header is validated as soon as its 12 bytes are in, so a record over
    ``max_length`` fails before its body is waited for.  ``receive_data(b"")``
    marks the end of the stream.  After a ProtocolError the decoder is dead and
    raises the same error again.
    """

    def __init__(
        self, max_length: int, expect_preamble: bool = True, npages_limit: int | None = None
    ) -> None:
        self.max_length = max_length
        self.npages_limit = npages_limit
        self._buf = bytearray()
        self._need_preamble = expect_preamble
        self._header: RecordHeader | None = None
        self._descriptor_size: int | None = None
        self._eof = False
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as events."""
        return len(self._buf)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            self._eof = True
            return
        if self._eof:
            raise ProtocolError("data received after the end of the stream", remote=False)
        self._buf += data

    def next_event(self) -> Event:
        if self._error is not None:
            raise self._error
        try:
            return self._next_event()
        except ProtocolError as exc:
            self._error = exc
            raise

    def _next_event(self) -> Event:
        buf = self._buf
        if self._need_preamble:
            if len(buf) < len(PREAMBLE):
                if not PREAMBLE.startswith(bytes(buf)) or (self._eof and buf):
                    check_preamble(buf)
                return self._starved()
            check_preamble(buf)
            del buf[: len(PREAMBLE)]
            self._need_preamble = False
        if self._header is None:
            if len(buf) < HEADER_SIZE:
                return self._starved()
            self._header = parse_header(buf, self.max_length)
            del buf[:HEADER_SIZE]
        header = self._header
        if header.type == RecordType.PAGES and self._descriptor_size is None:
            if len(buf) < PAGES_FIXED_SIZE:
                return self._starved()
            self._descriptor_size = pages_descriptor_size(header, buf)
        if len(buf) < header.length:
            return self._starved()
        body = bytes(buf[: header.length])
        del buf[: header.length]
        self._header = None
        if header.type != RecordType.PAGES:
            return decode_body(header, body)
        size, self._descriptor_size = self._descriptor_size, None
        assert size is not None
        pages = decode_pages(header, memoryview(body)[:size], self.npages_limit)
        return Pages(pages, body[size:])

    def _starved(self) -> NeedData | EndOfStream:
        if not self._eof:
            return NEED_DATA
        if self._buf or self._header is not None:
            raise ProtocolError("stream truncated in the middle of a record")
        return END_OF_STREAM

