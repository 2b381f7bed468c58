"""Byte-exact tests of the record codec (hyperframe style: literals both ways)."""

from __future__ import annotations

import ast
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

import relocd.protocol
from relocd.errors import ProtocolError, Reason
from relocd.protocol.codec import (
    END_OF_STREAM,
    HEADER_SIZE,
    NEED_DATA,
    PAGES_FIXED_SIZE,
    PREAMBLE,
    FrameDecoder,
    Pages,
    check_preamble,
    decode_body,
    decode_pages,
    encode,
    encode_pages_header,
    pages_descriptor_size,
    parse_header,
)
from relocd.protocol.records import (
    PAGE_SIZE,
    RECORD_CLASSES,
    Abort,
    ChannelEnd,
    Commit,
    Config,
    Digest,
    DigestAlgo,
    Done,
    EndRound,
    Feature,
    Go,
    Hello,
    Join,
    Joined,
    Outcome,
    OutcomeState,
    PagesHeader,
    Prepared,
    Query,
    Record,
    RecordType,
    Refuse,
    Reserve,
    Reserved,
    Resumed,
    Role,
    Stop,
    StreamChunk,
    VcpuState,
)

MID = bytes.fromhex("00112233445566778899aabbccddeeff")
LIMIT = 1 << 20

# (record, header "type flags reserved length crc", body) -- golden bytes.
GOLDEN: list[tuple[Record, str]] = [
    (Hello(1, 0, 0b111, Role.SOURCE, MID, "host-a"),
     "01 00 0000 00000027 862063b6  0001 0000 0000000000000007 01 000000"
     " 00112233445566778899aabbccddeeff 06 686f73742d61"),
    (Hello(1, 0, 0, Role.TARGET, bytes(16), ""),
     "01 00 0000 00000021 fc6a76ac  0001 0000 0000000000000000 02 000000"
     " 00000000000000000000000000000000 00"),
    (Reserve({"name": "vm1", "live": True}),
     "02 00 0000 0000001a d8cafa04  " + b'{"name":"vm1","live":true}'.hex()),
    (Reserved({"id": "r1", "expires_ms": 30000}),
     "03 00 0000 0000001e edbd1ba1  " + b'{"id":"r1","expires_ms":30000}'.hex()),
    (Refuse(Reason.NO_MEMORY, "no"), "04 00 0000 00000004 adeba3db  0005 6e6f"),
    (Config("(domain)"), "05 00 0000 00000008 9d0095b1  28646f6d61696e29"),
    (Join(bytes(range(16)), 1, 4),
     "06 00 0000 00000014 5fc10a22  000102030405060708090a0b0c0d0e0f 0001 0004"),
    (Joined(), "07 00 0000 00000000 6fe7d670"),
    (ChannelEnd(262144), "17 00 0000 00000008 4bb4877a  0000000000040000"),
    (EndRound(3, 256, 12),
     "11 00 0000 00000018 1cff2fc1  00000003 00000000 0000000000000100 000000000000000c"),
    (Stop(4), "12 00 0000 00000004 691bd7d5  00000004"),
    (VcpuState("kvm", b"\x01\x02"), "13 00 0000 00000006 398096e6  03 6b766d 0102"),
    (Digest(DigestAlgo.SHA256, bytes(range(32))),
     "14 00 0000 00000021 f3f02f10  01 " + bytes(range(32)).hex()),
    (Commit(), "15 00 0000 00000000 5179e026"),
    (StreamChunk(b"xen"), "16 00 0000 00000003 d713fadf  78656e"),
    (Prepared(), "20 00 0000 00000000 9c54bd3f"),
    (Go(), "21 00 0000 00000000 50febda1"),
    (Resumed(False, {"error": "x"}),
     "22 00 0000 0000000e 4dde92e9  00 " + b'{"error":"x"}'.hex()),
    (Done(), "23 00 0000 00000000 12dbbadc"),
    (Abort(Reason.TIMEOUT, "quiet"), "30 00 0000 00000007 ebc11855  000b 7175696574"),
    (Query(MID), "31 00 0000 00000010 dcb489f3  00112233445566778899aabbccddeeff"),
    (Outcome(MID, OutcomeState.GO_SENT),
     "32 00 0000 00000011 5cbf0c9f  00112233445566778899aabbccddeeff 05"),
]  # fmt: skip

PAGES_GOLDEN = (
    "10 00 0000 00002028 cbde864b"  # length 16 + 3*8 + 2*4096 = 0x2028
    " 00000007 00000002 00000001 00000000"  # round 7, 2 data, 1 zero
    " 0000000000000001 0000000000000002 0000000000000009"
)


def frame(rtype: int, body: bytes, *, flags: int = 0, reserved: int = 0) -> bytes:
    """A record with a correct CRC, built independently of the codec."""
    head = struct.pack("!BBHI", rtype, flags, reserved, len(body))
    return head + struct.pack("!I", zlib.crc32(head + body)) + body


def decode_one(data: bytes) -> Record:
    header = parse_header(data, LIMIT)
    return decode_body(header, data[HEADER_SIZE:])


def fails(data: bytes, *, max_length: int = LIMIT) -> ProtocolError:
    decoder = FrameDecoder(max_length, expect_preamble=False)
    decoder.receive_data(data)
    decoder.receive_data(b"")
    with pytest.raises(ProtocolError) as info:
        decoder.next_event()
    assert info.value.remote is True
    return info.value


def test_golden_covers_every_type_but_pages() -> None:
    assert {rec.TYPE for rec, _ in GOLDEN} == set(RecordType) - {RecordType.PAGES}


@pytest.mark.parametrize(("record", "wire"), GOLDEN, ids=lambda v: type(v).__name__)
def test_encode_is_byte_exact(record: Record, wire: str) -> None:
    assert encode(record) == bytes.fromhex(wire)


@pytest.mark.parametrize(("record", "wire"), GOLDEN, ids=lambda v: type(v).__name__)
def test_decode_is_byte_exact(record: Record, wire: str) -> None:
    decoded = decode_one(bytes.fromhex(wire))
    assert decoded == record
    assert type(decoded) is type(record)


@pytest.mark.parametrize(("record", "wire"), GOLDEN, ids=lambda v: type(v).__name__)
def test_crc_covers_header_and_body(record: Record, wire: str) -> None:
    data = bytes.fromhex(wire)
    assert zlib.crc32(data[:8] + data[12:]) == int.from_bytes(data[8:12], "big")
    assert frame(record.TYPE, data[12:]) == data


def test_pages_encode_and_decode_byte_exact() -> None:
    wire = bytes.fromhex(PAGES_GOLDEN)
    data, zero = np.array([1, 2], np.uint64), np.array([9], np.uint64)
    assert encode_pages_header(7, data, zero) == wire
    header = parse_header(wire, LIMIT)
    assert header.type is RecordType.PAGES and header.length == 0x2028
    assert pages_descriptor_size(header, wire[12 : 12 + PAGES_FIXED_SIZE]) == 40
    pages = decode_pages(header, wire[12:], npages_limit=10)
    assert pages == PagesHeader(7, data, zero)
    assert pages.payload_len == 2 * PAGE_SIZE
    assert pages.data_pfns.dtype == np.uint64


def test_pages_crc_covers_descriptor_not_payload() -> None:
    wire = bytes.fromhex(PAGES_GOLDEN)
    assert zlib.crc32(wire[:8] + wire[12:]) == int.from_bytes(wire[8:12], "big")
    payload = bytes(range(256)) * 32
    decoder = FrameDecoder(LIMIT, expect_preamble=False)
    decoder.receive_data(wire + payload)
    event = decoder.next_event()
    assert isinstance(event, Pages) and event.payload == payload
    corrupt = bytearray(wire)
    corrupt[-1] ^= 1  # last zero pfn
    decoder = FrameDecoder(LIMIT, expect_preamble=False)
    decoder.receive_data(bytes(corrupt) + payload)
    with pytest.raises(ProtocolError, match="CRC"):
        decoder.next_event()


def test_every_type_has_one_registered_class() -> None:
    assert set(RECORD_CLASSES) == set(RecordType)
    for rtype, cls in RECORD_CLASSES.items():
        assert cls.TYPE is rtype


@pytest.mark.parametrize(("record", "wire"), GOLDEN[:6], ids=lambda v: type(v).__name__)
def test_crc_mismatch_is_refused(record: Record, wire: str) -> None:
    data = bytearray.fromhex(wire)
    data[-1] ^= 0x40
    with pytest.raises(ProtocolError, match="CRC"):
        decode_one(bytes(data))


def test_header_claiming_4gib_fails_before_the_body() -> None:
    decoder = FrameDecoder(LIMIT)
    decoder.receive_data(PREAMBLE + bytes.fromhex("10 00 0000 ffffffff 00000000"))
    with pytest.raises(ProtocolError) as info:
        decoder.next_event()  # must not answer NEED_DATA
    assert info.value.reason is Reason.LIMIT
    assert decoder.buffered == HEADER_SIZE  # failed on the header alone
    with pytest.raises(ProtocolError):  # and the decoder stays dead
        decoder.next_event()


def test_length_limit_is_inclusive() -> None:
    at_limit = bytes.fromhex("05 00 0000 00000400 00000000")
    decoder = FrameDecoder(0x400, expect_preamble=False)
    decoder.receive_data(at_limit)
    assert decoder.next_event() is NEED_DATA
    with pytest.raises(ProtocolError, match="limit"):
        parse_header(at_limit, 0x3FF)


def test_per_type_body_bounds_checked_on_the_header() -> None:
    assert fails(frame(RecordType.COMMIT, b"\x00")).message.startswith("COMMIT")
    assert fails(frame(RecordType.STOP, b"\x00" * 3)).message.startswith("STOP")
    err = fails(bytes.fromhex("01 00 0000 00010000 00000000"))  # 64 KiB HELLO
    assert err.reason is Reason.LIMIT


@pytest.mark.parametrize("rtype", [0x00, 0x08, 0x0F, 0x18, 0x24, 0x33, 0x7F, 0xFF])
def test_unknown_types_are_refused(rtype: int) -> None:
    assert "unknown record type" in fails(frame(rtype, b"")).message


def test_nonzero_flags_and_reserved_are_refused() -> None:
    assert "flags" in fails(frame(RecordType.GO, b"", flags=1)).message
    assert "reserved" in fails(frame(RecordType.GO, b"", reserved=0x100)).message


def test_truncated_records_are_refused() -> None:
    whole = encode(Config("(domain (name vm1))"))
    for cut in (3, HEADER_SIZE, len(whole) - 1):
        assert "truncated" in fails(whole[:cut]).message
    header = parse_header(whole, LIMIT)
    with pytest.raises(ProtocolError):
        decode_body(header, whole[HEADER_SIZE:-1])
    with pytest.raises(ProtocolError):
        parse_header(whole[:11], LIMIT)


def test_clean_end_of_stream() -> None:
    decoder = FrameDecoder(LIMIT)
    decoder.receive_data(PREAMBLE + encode(Go()))
    assert decoder.next_event() == Go()
    assert decoder.next_event() is NEED_DATA
    decoder.receive_data(b"")
    assert decoder.next_event() is END_OF_STREAM


def test_byte_at_a_time() -> None:
    stream = PREAMBLE + b"".join(bytes.fromhex(w) for _, w in GOLDEN)
    decoder = FrameDecoder(LIMIT)
    events = []
    for i in range(len(stream)):
        decoder.receive_data(stream[i : i + 1])
        while (event := decoder.next_event()) is not NEED_DATA:
            events.append(event)
    assert events == [record for record, _ in GOLDEN]


@pytest.mark.parametrize(
    ("rtype", "body", "problem"),
    [
        (RecordType.CONFIG, b"(name \xff)", "UTF-8"),
        (RecordType.ABORT, b"\x00\x01\xc3\x28", "UTF-8"),
        (RecordType.REFUSE, b"\x00\x05\xed\xa0\x80", "UTF-8"),  # encoded surrogate
        (RecordType.RESERVE, b"[1, 2]", "object"),
        (RecordType.RESERVE, b'"vm"', "object"),
        (RecordType.RESERVED, b"{'id': 1}", "JSON"),
        (RecordType.RESERVED, b'{"a": 1, "a": 2}', "duplicate"),
        (RecordType.RESERVE, b'{"x": NaN}', "JSON"),
        (RecordType.RESERVE, b'{"x": -1e400}', "out of range"),
        (RecordType.RESERVE, b"\xef\xbb\xbf{}", "JSON"),  # BOM
        (RecordType.RESERVE, b'{"a":' * 5000 + b"1" + b"}" * 5000, "JSON"),
        (RecordType.RESUMED, b"\x02{}", "ok flag"),
        (RecordType.RESUMED, b"\x01{\xff}", "UTF-8"),
        (RecordType.VCPU_STATE, b"\x00blob", "driver name"),
        (RecordType.VCPU_STATE, b"\x09kvm", "driver name"),
        (RecordType.VCPU_STATE, b"\x03k m", "driver name"),
        (RecordType.DIGEST, b"\x03" + bytes(32), "algorithm"),
        (RecordType.OUTCOME, bytes(16) + b"\x07", "state"),
        (RecordType.END_ROUND, b"\x00\x00\x00\x01\x00\x00\x00\x01" + bytes(16), "reserved"),
        (RecordType.HELLO, bytes.fromhex("0001 0000 0000000000000000 05 000000") + bytes(17), "role"),
        (RecordType.JOIN, bytes(16) + b"\x00\x00\x00\x02", "channel 0 of 2"),
        (RecordType.JOIN, bytes(16) + b"\x00\x02\x00\x02", "channel 2 of 2"),
        (RecordType.JOIN, bytes(16) + b"\x00\x01\x00\x11", "count <= 16"),
        (RecordType.HELLO, bytes.fromhex("0001 0000 0000000000000000 01 000100") + bytes(17), "reserved"),
        (RecordType.HELLO, bytes.fromhex("0001 0000 0000000000000000 01 000000") + bytes(16) + b"\x05ab", "past the end"),
        (RecordType.HELLO, bytes.fromhex("0001 0000 0000000000000000 01 000000") + bytes(16) + b"\x01\n", "control"),
        (RecordType.HELLO, bytes.fromhex("0001 0000 0000000000000000 01 000000") + bytes(16) + b"\x00xx", "trailing"),
    ],
)  # fmt: skip
def test_malformed_bodies_are_protocol_errors(rtype: int, body: bytes, problem: str) -> None:
    err = fails(frame(rtype, body))
    assert problem in err.message


def test_hello_of_another_major_version() -> None:
    body = struct.pack("!HH", 2, 0) + b"whatever major 2 puts here"
    err = fails(frame(RecordType.HELLO, body))
    assert err.reason is Reason.VERSION
    assert "2.x" in err.message


def test_hello_from_a_newer_minor_may_append_fields() -> None:
    body = bytes.fromhex("0001 0003 8000000000000005 01 000000") + MID + b"\x01a" + b"new"
    hello = decode_one(frame(RecordType.HELLO, body))
    assert isinstance(hello, Hello)
    assert (hello.minor, hello.node) == (3, "a")
    assert hello.features == 0x8000000000000005  # unknown bits kept ...
    assert hello.known_features == Feature.ZERO_PAGES | Feature.QUERY  # ... and ignored


def test_unknown_reason_reads_as_unspecified() -> None:
    record = decode_one(frame(RecordType.ABORT, b"\x03\xe7newer reason"))
    assert record == Abort(Reason.UNSPECIFIED, "newer reason")


def test_preamble_checks() -> None:
    check_preamble(PREAMBLE)
    check_preamble(PREAMBLE + b"more")
    for bad, problem in [
        (PREAMBLE.replace(b"\r\n", b"\n") + b"x", "mangled"),
        (b"(receive)\n", "xend"),
        (b"GET / HT", "not a relocd stream"),
        (PREAMBLE[:5], "ended"),
    ]:
        with pytest.raises(ProtocolError, match=problem):
            check_preamble(bad)


def test_decoder_fails_on_a_bad_preamble_at_the_first_wrong_byte() -> None:
    decoder = FrameDecoder(LIMIT)
    decoder.receive_data(b"\x89R")
    assert decoder.next_event() is NEED_DATA
    decoder.receive_data(b"X")
    with pytest.raises(ProtocolError):
        decoder.next_event()


def pages_frame(fixed: tuple[int, int, int, int], pfns: list[int], payload_pages: int) -> bytes:
    body = struct.pack("!IIII", *fixed) + struct.pack(f"!{len(pfns)}Q", *pfns)
    head = struct.pack("!BBHI", 0x10, 0, 0, len(body) + payload_pages * PAGE_SIZE)
    crc = zlib.crc32(head + body)
    return head + struct.pack("!I", crc) + body + bytes(payload_pages * PAGE_SIZE)


def test_pages_checks() -> None:
    good = pages_frame((1, 2, 1, 0), [4, 5, 6], 2)
    decoder = FrameDecoder(LIMIT, expect_preamble=False, npages_limit=7)
    decoder.receive_data(good)
    assert isinstance(decoder.next_event(), Pages)
    assert "add up" in fails(pages_frame((1, 2, 1, 0), [4, 5, 6], 1)).message
    assert "reserved" in fails(pages_frame((1, 1, 0, 9), [4], 1)).message
    assert "increasing" in fails(pages_frame((1, 2, 0, 0), [5, 4], 2)).message
    assert "increasing" in fails(pages_frame((1, 0, 2, 0), [4, 4], 0)).message
    assert "both" in fails(pages_frame((1, 1, 1, 0), [4, 4], 1)).message
    decoder = FrameDecoder(LIMIT, expect_preamble=False, npages_limit=6)
    decoder.receive_data(good)
    with pytest.raises(ProtocolError, match="beyond"):
        decoder.next_event()


def test_pages_length_checked_before_the_payload_arrives() -> None:
    wire = pages_frame((1, 2, 0, 0), [1, 2], 3)  # claims 3 pages of payload, lists 2
    decoder = FrameDecoder(LIMIT, expect_preamble=False)
    decoder.receive_data(wire[: HEADER_SIZE + PAGES_FIXED_SIZE])
    with pytest.raises(ProtocolError, match="add up"):
        decoder.next_event()


@pytest.mark.parametrize(
    "record",
    [
        Hello(2, 0, 0, Role.SOURCE, MID, "a"),
        Hello(1, 0, 0, Role.SOURCE, b"short", "a"),
        Hello(1, 0, 1 << 64, Role.SOURCE, MID, "a"),
        Hello(1, 0, 0, Role.SOURCE, MID, "x" * 256),
        Hello(1, 0, 0, Role.SOURCE, MID, "tab\there"),
        Hello(1, 0, 0, 9, MID, "a"),  # type: ignore[arg-type]
        Reserve({"x": object()}),
        Reserve({"x": float("nan")}),
        Reserve([1]),  # type: ignore[arg-type]
        Reserved({"big": "x" * 70000}),
        Refuse(Reason.BUSY, "\ud800"),
        Refuse(70000, "x"),  # type: ignore[arg-type]
        Abort(Reason.BUSY, "m" * 5000),
        EndRound(-1, 0, 0),
        Stop(1 << 32),
        VcpuState("", b""),
        VcpuState("k v m", b""),
        Digest(DigestAlgo.SHA256, b"short"),
        Digest(7, bytes(32)),  # type: ignore[arg-type]
        Resumed(1, {}),  # type: ignore[arg-type]
        Query(MID[:8]),
        Outcome(MID, 9),  # type: ignore[arg-type]
        PagesHeader(1, np.array([1]), np.array([])),
    ],
    ids=repr,
)
def test_invalid_records_refused_locally(record: Record) -> None:
    with pytest.raises(ProtocolError) as info:
        encode(record)
    assert info.value.remote is False


@pytest.mark.parametrize(
    ("data", "zero"),
    [([2, 1], []), ([1, 1], []), ([1], [1]), ([-1], []), ([1.5], []), ([[1]], [])],
)
def test_invalid_pfns_refused_locally(data: list[int], zero: list[int]) -> None:
    with pytest.raises(ProtocolError) as info:
        encode_pages_header(1, np.array(data), np.array(zero))
    assert info.value.remote is False


def test_encode_pages_header_accepts_empty_and_other_int_dtypes() -> None:
    a = encode_pages_header(1, np.array([3, 4], np.int64), [])
    b = encode_pages_header(1, np.array([3, 4], np.uint64), np.array([], np.uint64))
    assert a == b


def test_json_bodies_round_trip_unicode() -> None:
    record = Reserve({"name": "vm-é", "cpu_features": ["sse4_2"], "n": None, "f": 1.5})
    assert decode_one(encode(record)) == record
    assert json.loads(encode(record)[HEADER_SIZE:]) == record.request


FORBIDDEN_IMPORTS = {
    "asyncio", "socket", "ssl", "selectors", "select", "subprocess", "threading",
    "multiprocessing", "os", "io", "pathlib", "shutil", "mmap", "uvloop", "fcntl",
}  # fmt: skip


def test_protocol_package_does_no_io() -> None:
    package = Path(relocd.protocol.__file__).parent
    modules = sorted(package.glob("*.py"))
    assert len(modules) >= 4
    for module in modules:
        tree = ast.parse(module.read_text(), filename=str(module))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN_IMPORTS, f"{module.name} imports {name}"
