"""Wire records: one frozen dataclass per record type (hyperframe style).

Each class declares its ``TYPE`` byte and the bounds of its body, and turns
itself into body bytes (``serialize_body``) and back (``parse_body``).  The
12-byte record header and the CRC belong to ``codec``; this module only knows
bodies.  ``docs/protocol.md`` is the byte-by-byte spec these classes implement.

Errors: ``serialize_body`` raises ``ProtocolError(remote=False)`` (we were
about to send something invalid), ``parse_body`` raises
``ProtocolError(remote=True)`` (the peer sent it).  Nothing else escapes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Final, Self

import numpy as np

from relocd.errors import Reason
from relocd.protocol.codes import DIGEST_SIZES as DIGEST_SIZES
from relocd.protocol.codes import KNOWN_FEATURES as KNOWN_FEATURES
from relocd.protocol.codes import PROTOCOL_MAJOR as PROTOCOL_MAJOR
from relocd.protocol.codes import PROTOCOL_MINOR as PROTOCOL_MINOR
from relocd.protocol.codes import DigestAlgo as DigestAlgo
from relocd.protocol.codes import Feature as Feature
from relocd.protocol.codes import OutcomeState as OutcomeState
from relocd.protocol.codes import RecordType as RecordType
from relocd.protocol.codes import Role as Role
from relocd.protocol.recordbase import RECORD_CLASSES as RECORD_CLASSES
from relocd.protocol.recordbase import Record as Record
from relocd.protocol.recordbase import register
from relocd.protocol.fields import (
    MAX_CONFIG_BYTES,
    MAX_DRIVER_BYTES,
    MAX_HELLO_BYTES,
    MAX_JSON_BYTES,
    MAX_MESSAGE_BYTES,
    MAX_NODE_BYTES,
    MAX_VCPU_BLOB_BYTES,
    PFN_WIRE,
    PfnArray,
    check_id,
    check_uint,
    decode_json,
    decode_text,
    encode_json,
    encode_text,
    expect_min,
    expect_size,
    local_error,
    parse_reason,
    pfns_overlap,
    reason_body,
    remote_error,
    wire_pfns,
)
from relocd.protocol.fields import MIGRATION_ID_SIZE as MIGRATION_ID_SIZE
from relocd.protocol.fields import REASON_CODE
from relocd.protocol.fields import NO_MIGRATION_ID as NO_MIGRATION_ID
from relocd.units import PAGE_SIZE as PAGE_SIZE


_U8 = struct.Struct("!B")
_U16 = struct.Struct("!H")
_HELLO = struct.Struct("!HHQB3s16sB")  # major minor features role rsvd id node_len
_REASON = REASON_CODE
_PAGES_FIXED = struct.Struct("!IIII")  # round n_data n_zero reserved
_END_ROUND = struct.Struct("!IIQQ")  # round reserved pages_sent dirty_next
_STOP = struct.Struct("!I")
_DIGEST = struct.Struct("!B32s")
_QUERY = struct.Struct("!16s")
_OUTCOME = struct.Struct("!16sB")


@register
@dataclass(frozen=True, slots=True)
class Hello(Record):
    """First record each side sends: versions, features, role, migration id."""

    TYPE = RecordType.HELLO
    MIN_BODY = 4  # major + minor: the only bytes every major version shares
    MAX_BODY = MAX_HELLO_BYTES

    major: int
    minor: int
    features: int  # Feature bits; unknown bits are kept and ignored
    role: Role
    migration_id: bytes
    node: str

    @classmethod
    def current(
        cls,
        role: Role,
        migration_id: bytes = NO_MIGRATION_ID,
        node: str = "",
        features: int = KNOWN_FEATURES,
    ) -> Hello:
        """A HELLO for this implementation's protocol version."""
        return cls(PROTOCOL_MAJOR, PROTOCOL_MINOR, features, role, migration_id, node)

    @property
    def known_features(self) -> Feature:
        return Feature(self.features & KNOWN_FEATURES)

    def serialize_body(self) -> bytes:
        if self.major != PROTOCOL_MAJOR:
            raise local_error("HELLO", f"major version {self.major} is not ours", Reason.VERSION)
        minor = check_uint("HELLO minor", self.minor, 16)
        features = check_uint("HELLO features", self.features, 64)
        try:
            role = Role(self.role)
        except ValueError:
            raise local_error("HELLO", f"unknown role {self.role!r}") from None
        mid = check_id("HELLO", self.migration_id)
        node = encode_text("HELLO node name", self.node, MAX_NODE_BYTES, one_line=True)
        return _HELLO.pack(self.major, minor, features, role, bytes(3), mid, len(node)) + node

    @classmethod
    def parse_body(cls, body: memoryview) -> Self:
        expect_min("HELLO", body, 4)
        (major,) = _U16.unpack_from(body)
        if major != PROTOCOL_MAJOR:
            raise remote_error(
                "HELLO",
                f"peer speaks protocol {major}.x, we speak {PROTOCOL_MAJOR}.{PROTOCOL_MINOR}",
                Reason.VERSION,
            )
        expect_min("HELLO", body, _HELLO.size)
        _, minor, features, role, reserved, mid, node_len = _HELLO.unpack_from(body)
        if reserved != bytes(3):
            raise remote_error("HELLO", "reserved bytes are not zero")
        try:
            role = Role(role)
        except ValueError:
            raise remote_error("HELLO", f"unknown role {role}") from None
        end = _HELLO.size + node_len
        if len(body) < end:
            raise remote_error("HELLO", "node name runs past the end of the body")
        if len(body) > end and minor <= PROTOCOL_MINOR:
            raise remote_error("HELLO", f"{len(body) - end} trailing bytes")
        node = decode_text("HELLO node name", body[_HELLO.size : end], MAX_NODE_BYTES, one_line=True)
        return cls(major, minor, features, role, bytes(mid), node)


@register
@dataclass(frozen=True, slots=True)
class Reserve(Record):
    """The source's reservation request (validated by the engine, not here)."""

    TYPE = RecordType.RESERVE
    MIN_BODY = 2
    MAX_BODY = MAX_JSON_BYTES

    request: dict[str, Any]

    def serialize_body(self) -> bytes:
        return encode_json("RESERVE", self.request, MAX_JSON_BYTES)

    @classmethod
    def parse_body(cls, body: memoryview) -> Self:
        return cls(decode_json("RESERVE", body, MAX_JSON_BYTES))


@register
@dataclass(frozen=True, slots=True)
class Reserved(Record):
    """The target set resources aside: reservation id, expiry."""

    TYPE = RecordType.RESERVED
    MIN_BODY = 2
    MAX_BODY = MAX_JSON_BYTES

    info: dict[str, Any]

    def serialize_body(self) -> bytes:
        return encode_json("RESERVED", self.info, MAX_JSON_BYTES)

    @classmethod
    def parse_body(cls, body: memoryview) -> Self:
        return cls(decode_json("RESERVED", body, MAX_JSON_BYTES))


@register
@dataclass(frozen=True, slots=True)
class Refuse(Record):
    """The target will not take the domain; ends the conversation."""

    TYPE = RecordType.REFUSE
    MIN_BODY = _REASON.size
    MAX_BODY = _REASON.size + MAX_MESSAGE_BYTES

    reason: Reason
    message: str

    def serialize_body(self) -> bytes:
        return reason_body("REFUSE", self.reason, self.message)

    @classmethod
    def parse_body(cls, body: memoryview) -> Self:
        return cls(*parse_reason("REFUSE", body))


@register
@dataclass(frozen=True, slots=True)
class Config(Record):
    """The domain configuration as sxp text (the target needs no config file)."""

    TYPE = RecordType.CONFIG
    MIN_BODY = 0
    MAX_BODY = MAX_CONFIG_BYTES

    text: str

    def serialize_body(self) -> bytes:
        return encode_text("CONFIG", self.text, MAX_CONFIG_BYTES)

    @classmethod
    def parse_body(cls, body: memoryview) -> Self:
        return cls(decode_text("CONFIG", body, MAX_CONFIG_BYTES))


@register
@dataclass(frozen=True, slots=True, eq=False)
class PagesHeader(Record):
    """A PAGES batch without its payload: the descriptor (round and pfn lists).

    The payload (``n_data`` pages of PAGE_SIZE bytes, in ``data_pfns`` order)
    follows on the wire; the transport moves it straight to/from guest memory.
    Both pfn lists are strictly increasing and disjoint.
    """

    TYPE = RecordType.PAGES
    MIN_BODY = _PAGES_FIXED.size
    MAX_BODY = None

    round: int
    data_pfns: PfnArray
    zero_pfns: PfnArray

    @property
    def payload_len(self) -> int:
        return len(self.data_pfns) * PAGE_SIZE

    @property
    def descriptor_len(self) -> int:
        return _PAGES_FIXED.size + 8 * (len(self.data_pfns) + len(self.zero_pfns))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PagesHeader):
            return NotImplemented
        return (
            self.round == other.round
            and np.array_equal(self.data_pfns, other.data_pfns)
            and np.array_equal(self.zero_pfns, other.zero_pfns)
        )

    def serialize_body(self) -> bytes:
        """The descriptor: fixed part and pfn arrays (no payload)."""
        rnd = check_uint("PAGES round", self.round, 32)
        data = wire_pfns("PAGES data", self.data_pfns)
        zero = wire_pfns("PAGES zero", self.zero_pfns)
        if pfns_overlap(data, zero):
            raise local_error("PAGES", "a pfn is both in data_pfns and zero_pfns")
        fixed = _PAGES_FIXED.pack(rnd, len(data), len(zero), 0)
        return fixed + data.tobytes() + zero.tobytes()

    @classmethod
    def parse_body(cls, body: memoryview) -> Self:
        """Parse a descriptor (fixed part and pfn arrays, no payload)."""
        expect_min("PAGES descriptor", body, _PAGES_FIXED.size)
        rnd, n_data, n_zero, reserved = _PAGES_FIXED.unpack_from(body)
        if reserved:
            raise remote_error("PAGES", "reserved field is not zero")
        expect_size("PAGES descriptor", body, _PAGES_FIXED.size + 8 * (n_data + n_zero))
        data = np.frombuffer(body, PFN_WIRE, n_data, _PAGES_FIXED.size).astype(np.uint64)
        zero = np.frombuffer(body, PFN_WIRE, n_zero, _PAGES_FIXED.size + 8 * n_data)
        zero = zero.astype(np.uint64)
        for name, arr in (("data", data), ("zero", zero)):
            if np.any(arr[1:] <= arr[:-1]):
                raise remote_error("PAGES", f"{name} pfns are not strictly increasing")
        if pfns_overlap(data, zero):
            raise remote_error("PAGES", "a pfn is both in data_pfns and zero_pfns")
        data.flags.writeable = False
        zero.flags.writeable = False
        return cls(rnd, data, zero)


@register
@dataclass(frozen=True, slots=True)
class EndRound(Record):
    """Closes a precopy round; ``dirty_next`` is what the next round will send."""

    TYPE = RecordType.END_ROUND
    MIN_BODY = MAX_BODY = _END_ROUND.size

    round: int
    pages_sent: int
    dirty_next: int

    def serialize_body(self) -> bytes:
        rnd = check_uint("END_ROUND round", self.round, 32)
        sent = check_uint("END_ROUND pages_sent", self.pages_sent, 64)
        dirty = check_uint("END_ROUND dirty_next", self.dirty_next, 64)
        return _END_ROUND.pack(rnd, 0, sent, dirty)

    @classmethod
    def parse_body(cls, body: memoryview) -> Self:
        expect_size("END_ROUND", body, _END_ROUND.size)
        rnd, reserved, sent, dirty = _END_ROUND.unpack_from(body)
        if reserved:
            raise remote_error("END_ROUND", "reserved field is not zero")
        return cls(rnd, sent, dirty)


@register
@dataclass(frozen=True, slots=True)
class Stop(Record):
    """Stop-and-copy begins: the source domain is paused from here on."""

    TYPE = RecordType.STOP
    MIN_BODY = MAX_BODY = _STOP.size

    round: int

    def serialize_body(self) -> bytes:
        return _STOP.pack(check_uint("STOP round", self.round, 32))

    @classmethod
    def parse_body(cls, body: memoryview) -> Self:
        expect_size("STOP", body, _STOP.size)
        return cls(_STOP.unpack_from(body)[0])


_DRIVER_CHARS: Final = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-"
)


@register
@dataclass(frozen=True, slots=True)
class VcpuState(Record):
    """vCPU and device state: an opaque blob only the named driver reads back."""

    TYPE = RecordType.VCPU_STATE
    MIN_BODY = 2
    MAX_BODY = 1 + MAX_DRIVER_BYTES + MAX_VCPU_BLOB_BYTES

    driver: str
    blob: bytes

    def serialize_body(self) -> bytes:
        if not isinstance(self.driver, str) or not self.driver:
            raise local_error("VCPU_STATE", "driver name must be a non-empty str")
        if not set(self.driver) <= _DRIVER_CHARS or len(self.driver) > MAX_DRIVER_BYTES:
            raise local_error("VCPU_STATE", f"bad driver name {self.driver!r}")
        if not isinstance(self.blob, bytes | bytearray | memoryview):
            raise local_error("VCPU_STATE", "blob must be bytes")
        if len(self.blob) > MAX_VCPU_BLOB_BYTES:
            raise local_error("VCPU_STATE", f"blob of {len(self.blob)} bytes", Reason.LIMIT)
        name = self.driver.encode("ascii")
        return _U8.pack(len(name)) + name + bytes(self.blob)

    @classmethod
    def parse_body(cls, body: memoryview) -> Self:
        expect_min("VCPU_STATE", body, 2)
        name_len = body[0]
        if name_len == 0 or name_len > MAX_DRIVER_BYTES or len(body) < 1 + name_len:
            raise remote_error("VCPU_STATE", f"bad driver name length {name_len}")
        raw = bytes(body[1 : 1 + name_len])
        if not set(raw.decode("latin-1")) <= _DRIVER_CHARS:
            raise remote_error("VCPU_STATE", f"bad driver name {raw!r}")
        blob = body[1 + name_len :]
        if len(blob) > MAX_VCPU_BLOB_BYTES:
            raise remote_error("VCPU_STATE", f"blob of {len(blob)} bytes", Reason.LIMIT)
        return cls(raw.decode("ascii"), bytes(blob))


@register
@dataclass(frozen=True, slots=True)
class StreamChunk(Record):
    """A piece of a driver's own migration stream, for domains whose hypervisor
    moves memory itself (Xen PV: libxenguest's stream); relocd carries it opaquely."""

    TYPE = RecordType.STREAM
    MIN_BODY = 1
    MAX_BODY = None  # bounded by the connection's max frame

    data: bytes

    def serialize_body(self) -> bytes:
        if not isinstance(self.data, bytes | bytearray | memoryview) or not len(self.data):
            raise local_error("STREAM", "data must be non-empty bytes")
        return bytes(self.data)

    @classmethod
    def parse_body(cls, body: memoryview) -> Self:
        expect_min("STREAM", body, 1)
        return cls(bytes(body))


@register
@dataclass(frozen=True, slots=True)
class Digest(Record):
    """Digest of all guest memory at the stop point (``migrate --verify``)."""

    TYPE = RecordType.DIGEST
    MIN_BODY = MAX_BODY = _DIGEST.size

    algo: DigestAlgo
    value: bytes

    def serialize_body(self) -> bytes:
        if self.algo not in DIGEST_SIZES:
            raise local_error("DIGEST", f"unknown algorithm {self.algo!r}")
        if not isinstance(self.value, bytes) or len(self.value) != DIGEST_SIZES[self.algo]:
            raise local_error("DIGEST", "value has the wrong size")
        return _DIGEST.pack(self.algo, self.value)

    @classmethod
    def parse_body(cls, body: memoryview) -> Self:
        expect_size("DIGEST", body, _DIGEST.size)
        algo, value = _DIGEST.unpack_from(body)
        if algo not in DIGEST_SIZES:
            raise remote_error("DIGEST", f"unknown algorithm {algo}")
        return cls(DigestAlgo(algo), value)


class _EmptyRecord(Record):
    """A record whose type says it all."""

    __slots__ = ()
    MIN_BODY = MAX_BODY = 0

    def serialize_body(self) -> bytes:
        return b""

    @classmethod
    def parse_body(cls, body: memoryview) -> Self:
        expect_size(cls.TYPE.name, body, 0)
        return cls()


@register
@dataclass(frozen=True, slots=True)
class Commit(_EmptyRecord):
    """End of the stream: build the domain and answer PREPARED."""

    TYPE = RecordType.COMMIT


@register
@dataclass(frozen=True, slots=True)
class Prepared(_EmptyRecord):
    """The target built the domain (paused) and can resume it on GO."""

    TYPE = RecordType.PREPARED


@register
@dataclass(frozen=True, slots=True)
class Go(_EmptyRecord):
    """The source gave up its copy (journaled first): resume yours."""

    TYPE = RecordType.GO


@register
@dataclass(frozen=True, slots=True)
class Done(_EmptyRecord):
    """The source destroyed its copy; the migration is over."""

    TYPE = RecordType.DONE


@register
@dataclass(frozen=True, slots=True)
class Resumed(Record):
    """The target's answer to GO: did the domain resume, and details."""

    TYPE = RecordType.RESUMED
    MIN_BODY = 1 + 2
    MAX_BODY = 1 + MAX_JSON_BYTES

    ok: bool
    details: dict[str, Any]

    def serialize_body(self) -> bytes:
        if not isinstance(self.ok, bool):
            raise local_error("RESUMED", "ok must be a bool")
        return _U8.pack(int(self.ok)) + encode_json("RESUMED", self.details, MAX_JSON_BYTES)

    @classmethod
    def parse_body(cls, body: memoryview) -> Self:
        expect_min("RESUMED", body, 1)
        ok = body[0]
        if ok > 1:
            raise remote_error("RESUMED", f"ok flag is {ok}, expected 0 or 1")
        return cls(bool(ok), decode_json("RESUMED", body[1:], MAX_JSON_BYTES))


@register
@dataclass(frozen=True, slots=True)
class Abort(Record):
    """Either side gives up (before GO only); the source keeps the domain."""

    TYPE = RecordType.ABORT
    MIN_BODY = _REASON.size
    MAX_BODY = _REASON.size + MAX_MESSAGE_BYTES

    reason: Reason
    message: str

    def serialize_body(self) -> bytes:
        return reason_body("ABORT", self.reason, self.message)

    @classmethod
    def parse_body(cls, body: memoryview) -> Self:
        return cls(*parse_reason("ABORT", body))


@register
@dataclass(frozen=True, slots=True)
class Query(Record):
    """Recovery: what happened to this migration?"""

    TYPE = RecordType.QUERY
    MIN_BODY = MAX_BODY = _QUERY.size

    migration_id: bytes

    def serialize_body(self) -> bytes:
        return _QUERY.pack(check_id("QUERY", self.migration_id))

    @classmethod
    def parse_body(cls, body: memoryview) -> Self:
        expect_size("QUERY", body, _QUERY.size)
        return cls(_QUERY.unpack_from(body)[0])


@register
@dataclass(frozen=True, slots=True)
class Outcome(Record):
    """The target's answer to QUERY."""

    TYPE = RecordType.OUTCOME
    MIN_BODY = MAX_BODY = _OUTCOME.size

    migration_id: bytes
    state: OutcomeState

    def serialize_body(self) -> bytes:
        mid = check_id("OUTCOME", self.migration_id)
        try:
            state = OutcomeState(self.state)
        except ValueError:
            raise local_error("OUTCOME", f"unknown state {self.state!r}") from None
        return _OUTCOME.pack(mid, state)

    @classmethod
    def parse_body(cls, body: memoryview) -> Self:
        expect_size("OUTCOME", body, _OUTCOME.size)
        mid, state = _OUTCOME.unpack_from(body)
        try:
            return cls(mid, OutcomeState(state))
        except ValueError:
            raise remote_error("OUTCOME", f"unknown state {state}") from None


# The extra channels' records live in their own module; importing them here
# registers them, so every reader of records knows every type.
from relocd.protocol.channel_records import ChannelEnd as ChannelEnd  # noqa: E402
from relocd.protocol.channel_records import Join as Join  # noqa: E402
from relocd.protocol.channel_records import Joined as Joined  # noqa: E402

assert set(RECORD_CLASSES) == set(RecordType), "every record type has one class"
