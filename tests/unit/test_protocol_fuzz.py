"""Property tests: every record round-trips, and no input raises anything but ProtocolError."""

from __future__ import annotations

import os
import struct
import zlib
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relocd.errors import ProtocolError, Reason
from relocd.protocol.codec import (
    END_OF_STREAM,
    HEADER_SIZE,
    NEED_DATA,
    PREAMBLE,
    FrameDecoder,
    Pages,
    decode_body,
    encode,
    encode_pages_header,
    parse_header,
)
from relocd.protocol.records import (
    PAGE_SIZE,
    RECORD_CLASSES,
    Abort,
    Commit,
    Config,
    Digest,
    DigestAlgo,
    Done,
    EndRound,
    Go,
    Hello,
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
from relocd.protocol.state import Conversation

#: RELOCD_FUZZ_EXAMPLES=5000 for a longer run; the default keeps the suite fast.
FUZZ = settings(max_examples=int(os.environ.get("RELOCD_FUZZ_EXAMPLES", "150")), deadline=None, suppress_health_check=[HealthCheck.too_slow])
LIMIT = 1 << 20

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)
ids = st.binary(min_size=16, max_size=16)
text = st.text(st.characters(codec="utf-8"), max_size=200)
one_line = st.text(st.characters(codec="utf-8", exclude_categories=["Cc"]), max_size=60)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=20,
)
json_objects = st.dictionaries(text, json_values, max_size=6)


@st.composite
def pages_headers(draw: st.DrawFn) -> PagesHeader:
    pfns = sorted(draw(st.sets(u64, max_size=24)))
    in_data = draw(st.lists(st.booleans(), min_size=len(pfns), max_size=len(pfns)))
    data = [p for p, d in zip(pfns, in_data) if d]
    zero = [p for p, d in zip(pfns, in_data) if not d]
    return PagesHeader(draw(u32), np.array(data, np.uint64), np.array(zero, np.uint64))


records: st.SearchStrategy[Record] = st.one_of(
    st.builds(Hello, st.just(1), u16, u64, st.sampled_from(Role), ids, one_line),
    st.builds(Reserve, json_objects),
    st.builds(Reserved, json_objects),
    st.builds(Refuse, st.sampled_from(Reason), text),
    st.builds(Config, st.text(st.characters(codec="utf-8"), max_size=2000)),
    st.builds(EndRound, u32, u64, u64),
    st.builds(Stop, u32),
    st.builds(StreamChunk, st.binary(min_size=1, max_size=200)),
    st.builds(
        VcpuState,
        st.text("abcxyzABC019_.-", min_size=1, max_size=64),
        st.binary(max_size=300),
    ),
    st.builds(Digest, st.just(DigestAlgo.SHA256), st.binary(min_size=32, max_size=32)),
    st.builds(Commit),
    st.builds(Prepared),
    st.builds(Go),
    st.builds(Resumed, st.booleans(), json_objects),
    st.builds(Done),
    st.builds(Abort, st.sampled_from(Reason), text),
    st.builds(Query, ids),
    st.builds(Outcome, ids, st.sampled_from(OutcomeState)),
)


def wire_of(record: Record) -> bytes:
    if isinstance(record, PagesHeader):
        payload = b"".join(struct.pack("!Q", int(p)) * (PAGE_SIZE // 8) for p in record.data_pfns)
        return encode_pages_header(record.round, record.data_pfns, record.zero_pfns) + payload
    return encode(record)


def drain(decoder: FrameDecoder) -> list[Any]:
    events = []
    while (event := decoder.next_event()) is not NEED_DATA and event is not END_OF_STREAM:
        events.append(event)
    return events


@FUZZ
@given(st.lists(records | pages_headers(), min_size=1, max_size=6), st.data())
def test_records_round_trip_through_the_decoder(batch: list[Record], data: st.DataObject) -> None:
    stream = PREAMBLE + b"".join(wire_of(r) for r in batch)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    decoder = FrameDecoder(LIMIT)
    events = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)]):
        if end == start:
            continue  # b"" would mean end of stream
        decoder.receive_data(stream[start:end])
        events += drain(decoder)
    decoder.receive_data(b"")
    assert decoder.next_event() is END_OF_STREAM
    decoded = [e.header if isinstance(e, Pages) else e for e in events]
    assert decoded == batch
    for event, record in zip(events, batch):
        assert type(event) is (Pages if isinstance(record, PagesHeader) else type(record))
        if isinstance(event, Pages):
            assert len(event.payload) == event.header.payload_len


@FUZZ
@given(st.binary(max_size=400), st.booleans())
def test_arbitrary_bytes_only_raise_protocol_errors(data: bytes, with_preamble: bool) -> None:
    decoder = FrameDecoder(4096, expect_preamble=with_preamble)
    try:
        decoder.receive_data(data)
        drain(decoder)
        decoder.receive_data(b"")
        drain(decoder)
    except ProtocolError:
        pass


@FUZZ
@given(st.lists(records, min_size=1, max_size=4), st.data())
def test_mutated_streams_only_raise_protocol_errors(batch: list[Record], data: st.DataObject) -> None:
    stream = bytearray(PREAMBLE + b"".join(encode(r) for r in batch))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(stream) - 1))
        stream[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(stream)))
    decoder = FrameDecoder(LIMIT)
    try:
        decoder.receive_data(bytes(stream[:cut]))
        drain(decoder)
        decoder.receive_data(b"")
        drain(decoder)
    except ProtocolError:
        pass


def framed(rtype: int, body: bytes) -> bytes:
    head = struct.pack("!BBHI", rtype, 0, 0, len(body))
    return head + struct.pack("!I", zlib.crc32(head + body)) + body


@FUZZ
@given(st.sampled_from(sorted(set(RecordType) - {RecordType.PAGES})), st.binary(max_size=120))
def test_bodies_with_valid_crc_decode_or_raise_protocol_error(rtype: RecordType, body: bytes) -> None:
    """Past the CRC: random bodies reach every parse_body; a parsed one re-encodes stably."""
    if rtype is RecordType.HELLO and len(body) >= 2:
        body = b"\x00\x01" + body[2:]  # get past the version check most of the time
    wire = framed(rtype, body)
    try:
        record = decode_body(parse_header(wire, LIMIT), wire[HEADER_SIZE:])
    except ProtocolError:
        return
    assert isinstance(record, RECORD_CLASSES[rtype])
    again = encode(record)
    assert decode_body(parse_header(again, LIMIT), again[HEADER_SIZE:]) == record


@FUZZ
@given(u32, st.integers(0, 3), st.integers(0, 3), u32, st.lists(u64, max_size=6), st.binary(max_size=8))
def test_pages_descriptors_with_valid_crc(
    rnd: int, n_data: int, n_zero: int, reserved: int, pfns: list[int], junk: bytes
) -> None:
    descriptor = struct.pack("!IIII", rnd, n_data, n_zero, reserved % 2)
    descriptor += b"".join(struct.pack("!Q", p) for p in pfns) + junk
    head = struct.pack("!BBHI", 0x10, 0, 0, len(descriptor) + n_data * PAGE_SIZE)
    wire = head + struct.pack("!I", zlib.crc32(head + descriptor)) + descriptor
    decoder = FrameDecoder(LIMIT, expect_preamble=False, npages_limit=1 << 40)
    try:
        decoder.receive_data(wire + bytes(n_data * PAGE_SIZE))
        events = drain(decoder)
    except ProtocolError:
        return
    assert len(events) == 1 and isinstance(events[0], Pages)
    header = events[0].header
    assert (len(header.data_pfns), len(header.zero_pfns)) == (n_data, n_zero)


@FUZZ
@given(st.sampled_from([Role.SOURCE, Role.TARGET, Role.QUERY]), st.lists(
    st.tuples(st.booleans(), records | pages_headers()), max_size=12))
def test_conversation_only_raises_protocol_errors(role: Role, moves: list[tuple[bool, Record]]) -> None:
    conv = Conversation(role)
    for ours, record in moves:
        before = conv.state
        try:
            (conv.send if ours else conv.receive)(record)
        except ProtocolError as exc:
            assert exc.remote is not ours
            assert conv.state is before
