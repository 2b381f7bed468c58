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
import os
import struct
from dataclasses import dataclass
from typing import Any

from relocd.drivers.base import ForeignImage
from relocd.drivers.xen import config as xencfg
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
    libxl_options: int = 0


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
    ident, version, options = _LIBXL_HEADER.unpack_from(data, at)
    if ident != LIBXL_IDENT:
        raise DriverError("xen driver: xl save image has no libxl stream")
    at += _LIBXL_HEADER.size
    rtype, rlen = _RECORD.unpack_from(data, at)
    return ImagePrefix(mandatory, config, version, rtype, at + _RECORD.size + rlen + (-rlen % 8), options)


# -- restoring a file ``xl save`` wrote (``relocd restore FILE``) ----------------

#: what a message calls such a file, and where it can be restored
IMAGE_KIND = "an xl save image"
IMAGE_HOST = "a Xen host"
#: longest optional-data block (xl's JSON config) read from a file
MAX_OPTIONAL = 16 << 20


def is_image(head: bytes) -> bool:
    return head.startswith(XL_MAGIC)


def read_image(fd: int, size: int) -> ForeignImage | None:
    """The xl save image in open file ``fd`` (``size`` bytes), ready for ``XenDriver.receive_stream``.

    None when the file is no xl save image; DriverError when it is one
    relocd cannot restore (truncated, no JSON config, another stream
    version).  The whole file is not checked here: the libxenguest stream
    carries its own checks, and xl's restore refuses a bad one before the
    domain runs.  What is checked: the header, the config, that the
    libxenguest stream starts where relocd's own images start it (after an
    empty ``LIBXC_CONTEXT``), and that the file ends with libxl's END record
    (a file cut short does not).  The stream range excludes that END: the
    driver's receiver writes its own.
    """
    head = os.pread(fd, _XL_HEADER.size, 0)
    if not is_image(head):
        return None

    def refuse(why: str) -> DriverError:
        return DriverError(f"{IMAGE_KIND}, but {why}")

    if len(head) < _XL_HEADER.size:
        raise refuse("truncated (no header)")
    optlen = _XL_HEADER.unpack_from(head)[4]
    if optlen > MAX_OPTIONAL:
        raise refuse(f"its config block is {optlen} bytes long (at most {MAX_OPTIONAL})")
    want = _XL_HEADER.size + optlen + _LIBXL_HEADER.size + _RECORD.size
    data = os.pread(fd, want, 0)
    try:
        prefix = read_prefix(data)
    except DriverError as exc:
        raise refuse(exc.message.removeprefix("xen driver: ")) from None
    if prefix.mandatory_flags & ~(XL_FLAG_JSON | XL_FLAG_STREAM_V2):
        raise refuse(f"it needs xl features relocd does not know (mandatory flags {prefix.mandatory_flags:#x})")
    if not prefix.mandatory_flags & XL_FLAG_STREAM_V2:
        raise refuse("it holds a legacy (pre-4.6) stream; restore it with xl")
    if not prefix.mandatory_flags & XL_FLAG_JSON or not prefix.config:
        raise refuse("it carries no JSON domain config; restore it with xl and a config file")
    if prefix.libxl_version != LIBXL_VERSION or prefix.libxl_options != 0:
        raise refuse(
            f"its libxl stream is version {prefix.libxl_version} with options {prefix.libxl_options:#x}"
            f" (relocd reads version {LIBXL_VERSION}, little-endian, native)"
        )
    if prefix.first_record != REC_LIBXC_CONTEXT:
        raise refuse(f"its libxl stream starts with record type {prefix.first_record}, not LIBXC_CONTEXT")
    end = image_suffix()
    if size < prefix.size + len(end) or os.pread(fd, len(end), size - len(end)) != end:
        raise refuse("truncated (it does not end with libxl's END record)")
    try:
        config = xencfg.from_libxl_json(prefix.config)
    except DriverError as exc:
        raise refuse(exc.message.removeprefix("xen driver: ")) from None
    return ForeignImage(
        driver=xencfg.DRIVER_NAME,
        kind=IMAGE_KIND,
        host=IMAGE_HOST,
        config=config,
        stream_start=prefix.size,
        stream_end=size - len(end),
    )
