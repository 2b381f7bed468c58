"""Field codecs shared by the record classes: integers, text, JSON, ids, pfns.

Every helper that reads peer bytes raises ``ProtocolError(remote=True)``;
every helper that checks what we are about to send raises
``ProtocolError(remote=False)``.  No other exception escapes.
"""

from __future__ import annotations

import json
import struct
import unicodedata
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from relocd.errors import ProtocolError, Reason

MIGRATION_ID_SIZE: Final = 16
NO_MIGRATION_ID: Final = bytes(MIGRATION_ID_SIZE)

# Bounds on variable-length fields (docs/protocol.md, "Limits").
MAX_HELLO_BYTES: Final = 1024  # HELLO body, room for minor-version additions
MAX_NODE_BYTES: Final = 255  # u8 length prefix
MAX_MESSAGE_BYTES: Final = 4096  # REFUSE / ABORT text
MAX_JSON_BYTES: Final = 64 * 1024  # RESERVE / RESERVED / RESUMED objects
MAX_CONFIG_BYTES: Final = 1024 * 1024  # CONFIG sxp text
MAX_DRIVER_BYTES: Final = 64  # VCPU_STATE driver name
MAX_VCPU_BLOB_BYTES: Final = 64 * 1024 * 1024  # VCPU_STATE opaque blob

PfnArray = npt.NDArray[np.uint64]
PFN_WIRE: Final = np.dtype(">u8")  # pfns travel as big-endian u64


def remote_error(what: str, problem: str, reason: Reason = Reason.PROTOCOL) -> ProtocolError:
    return ProtocolError(f"{what}: {problem}", remote=True, reason=reason)


def local_error(what: str, problem: str, reason: Reason = Reason.PROTOCOL) -> ProtocolError:
    return ProtocolError(f"cannot send {what}: {problem}", remote=False, reason=reason)


def check_uint(what: str, value: object, bits: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise local_error(what, f"expected an integer, got {type(value).__name__}")
    if not 0 <= int(value) < (1 << bits):
        raise local_error(what, f"{value} does not fit in u{bits}")
    return int(value)


def encode_text(what: str, text: object, limit: int, *, one_line: bool = False) -> bytes:
    if not isinstance(text, str):
        raise local_error(what, f"expected str, got {type(text).__name__}")
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:
        raise local_error(what, "not encodable as UTF-8") from None
    if len(raw) > limit:
        raise local_error(what, f"{len(raw)} bytes, the limit is {limit}", Reason.LIMIT)
    if one_line and _has_control(text):
        raise local_error(what, "contains control characters")
    return raw


def decode_text(what: str, raw: memoryview, limit: int, *, one_line: bool = False) -> str:
    if len(raw) > limit:
        raise remote_error(what, f"{len(raw)} bytes, the limit is {limit}", Reason.LIMIT)
    try:
        text = str(raw, "utf-8")
    except UnicodeDecodeError:
        raise remote_error(what, "not valid UTF-8") from None
    if one_line and _has_control(text):
        raise remote_error(what, "contains control characters")
    return text


def _has_control(text: str) -> bool:
    return any(unicodedata.category(c) == "Cc" for c in text)


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key in JSON object")
    return obj


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):  # e.g. 1e400: JSON we could not send back
        raise ValueError(f"number {text[:20]} out of range")
    return value


def encode_json(what: str, obj: object, limit: int) -> bytes:
    if not isinstance(obj, dict):
        raise local_error(what, f"expected a dict, got {type(obj).__name__}")
    try:
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        raw = text.encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        raise local_error(what, f"not JSON-serializable ({exc})") from None
    if len(raw) > limit:
        raise local_error(what, f"{len(raw)} bytes of JSON, the limit is {limit}", Reason.LIMIT)
    return raw


def decode_json(what: str, raw: memoryview, limit: int) -> dict[str, Any]:
    text = decode_text(what, raw, limit)
    try:
        obj = json.loads(
            text,
            object_pairs_hook=_unique_object,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
        )
    except (ValueError, RecursionError) as exc:
        problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise remote_error(what, f"invalid JSON ({problem})") from None
    if not isinstance(obj, dict):
        raise remote_error(what, f"JSON must be an object, got {type(obj).__name__}")
    return obj


def expect_size(what: str, body: memoryview, size: int) -> None:
    if len(body) != size:
        raise remote_error(what, f"body is {len(body)} bytes, expected {size}")


def expect_min(what: str, body: memoryview, size: int) -> None:
    if len(body) < size:
        raise remote_error(what, f"body is {len(body)} bytes, at least {size} needed")



def check_id(what: str, value: object) -> bytes:
    if not isinstance(value, bytes | bytearray) or len(value) != MIGRATION_ID_SIZE:
        raise local_error(what, "migration id must be 16 bytes")
    return bytes(value)



def wire_pfns(what: str, pfns: object) -> npt.NDArray[Any]:
    arr = np.asarray(pfns)
    if arr.ndim != 1:
        raise local_error(what, "pfns must be a 1-D array")
    if arr.size == 0:
        return np.empty(0, dtype=PFN_WIRE)
    if arr.dtype.kind not in "ui":
        raise local_error(what, f"pfns must be integers, got {arr.dtype}")
    if arr.dtype.kind == "i" and int(arr.min()) < 0:
        raise local_error(what, "negative pfn")
    wire = arr.astype(PFN_WIRE)
    if np.any(wire[1:] <= wire[:-1]):
        raise local_error(what, "pfns must be strictly increasing")
    return wire


def pfns_overlap(data_pfns: PfnArray, zero_pfns: PfnArray) -> bool:
    """True when two sorted pfn arrays share a pfn."""
    if len(data_pfns) == 0 or len(zero_pfns) == 0:
        return False
    idx = np.searchsorted(data_pfns, zero_pfns)
    inside = idx < len(data_pfns)
    return bool(np.any(data_pfns[idx[inside]] == zero_pfns[inside]))


#: reason code (REFUSE, ABORT): u16
REASON_CODE: Final = struct.Struct("!H")


def reason_body(what: str, reason: object, message: str) -> bytes:
    """The body of REFUSE / ABORT: a reason code and a one-line message."""
    code = check_uint(f"{what} reason", reason, 16)
    return REASON_CODE.pack(code) + encode_text(f"{what} message", message, MAX_MESSAGE_BYTES)


def parse_reason(what: str, body: memoryview) -> tuple[Reason, str]:
    expect_min(what, body, REASON_CODE.size)
    (code,) = REASON_CODE.unpack_from(body)
    try:
        reason = Reason(code)
    except ValueError:  # added by a newer peer: the message still says why
        reason = Reason.UNSPECIFIED
    return reason, decode_text(f"{what} message", body[REASON_CODE.size :], MAX_MESSAGE_BYTES)
