"""The xl save image around a libxenguest stream: what ``xl restore`` reads.

``xc_domain_save`` writes only libxenguest's own stream (memory, vCPUs,
page-table normalisation: Xen's business).  ``xl restore`` wants it wrapped,
as ``xl save`` and ``xl migrate`` write it:

1. xl's header (``tools/xl/xl.h``, ``struct save_file_header``): a 32-byte
   magic, then four native-order u32s (byte-order mark ``0x01020304``,
   mandatory flags ``STREAMv2 | JSON``, optional flags 0, optional-data
   length), then the optional data: a u32 length and libxl's JSON domain
   configuration, NUL-terminated;
2. libxl's stream (``docs/specs/libxl-migration-stream.pandoc``): a
   big-endian header (``LibxlFmt``, version 2, options 0 = little-endian),
   one ``LIBXC_CONTEXT`` record (empty: "hand the fd to xc_domain_restore"),
3. the libxenguest stream, which ends with its own END record,
4. libxl's ``END`` record.

Records are ``type:u32 length:u32 body`` little-endian, padded to 8 bytes.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

from relocd.errors import DriverError

XL_MAGIC = b"Xen saved domain, xl format\n \0 \r"
XL_BYTEORDER = 0x01020304
XL_FLAG_JSON = 1 << 0
XL_FLAG_STREAM_V2 = 1 << 1
_XL_HEADER = struct.Struct("<32sIIII")

LIBXL_IDENT = 0x4C6962786C466D74  # "LibxlFmt"
LIBXL_VERSION = 2
_LIBXL_HEADER = struct.Struct(">QII")
_RECORD = struct.Struct("<II")

REC_END = 0
REC_LIBXC_CONTEXT = 1

assert len(XL_MAGIC) == 32


def libxl_record(rtype: int, body: bytes = b"") -> bytes:
    """One libxl stream record, padded to a multiple of 8 bytes."""
    pad = -len(body) % 8
    return _RECORD.pack(rtype, len(body)) + body + b"\0" * pad


def image_prefix(config: dict[str, Any] | None) -> bytes:
    """Everything before the libxenguest stream: xl's header with ``config``, libxl's header, LIBXC_CONTEXT.

    Without a config (None), ``xl restore`` must be given an xl config file.
    """
    blob = json.dumps(config).encode() + b"\0" if config is not None else b""
    optional = struct.pack("<I", len(blob)) + blob
    flags = XL_FLAG_STREAM_V2 | (XL_FLAG_JSON if blob else 0)
    header = _XL_HEADER.pack(XL_MAGIC, XL_BYTEORDER, flags, 0, len(optional))
    return header + optional + _LIBXL_HEADER.pack(LIBXL_IDENT, LIBXL_VERSION, 0) + libxl_record(REC_LIBXC_CONTEXT)


def image_suffix() -> bytes:
    """What follows the libxenguest stream: libxl's END record."""
    return libxl_record(REC_END)


@dataclass(frozen=True)
class ImagePrefix:
    """What ``read_prefix`` found at the start of an xl save image."""

    mandatory_flags: int
    config: dict[str, Any]
    libxl_version: int
    first_record: int
    size: int  # bytes consumed: the libxenguest stream starts here


def read_prefix(data: bytes) -> ImagePrefix:
    """Parse an xl save image's prefix (as ``xl save`` or ``image_prefix`` writes it)."""
    if len(data) < _XL_HEADER.size or not data.startswith(XL_MAGIC):
        raise DriverError("xen driver: not an xl save image (bad magic)")
    _, order, mandatory, _optional, optlen = _XL_HEADER.unpack_from(data)
    if order != XL_BYTEORDER:
        raise DriverError("xen driver: xl save image has the wrong byte order")
    at = _XL_HEADER.size
    opt = data[at : at + optlen]
    at += optlen
    (clen,) = struct.unpack_from("<I", opt) if len(opt) >= 4 else (0,)
    try:
        config = json.loads(opt[4 : 4 + clen].rstrip(b"\0")) if clen else {}
    except ValueError as exc:
        raise DriverError(f"xen driver: xl save image's config is not JSON: {exc}") from None
    if len(data) < at + _LIBXL_HEADER.size + _RECORD.size:
        raise DriverError("xen driver: xl save image is truncated")
    ident, version, _options = _LIBXL_HEADER.unpack_from(data, at)
    if ident != LIBXL_IDENT:
        raise DriverError("xen driver: xl save image has no libxl stream")
    at += _LIBXL_HEADER.size
    rtype, rlen = _RECORD.unpack_from(data, at)
    return ImagePrefix(mandatory, config, version, rtype, at + _RECORD.size + rlen + (-rlen % 8))
