#!/usr/bin/env python3
"""Fuzz the wire codec: FrameDecoder, record bodies, and the conversation table.

Input layout: byte 0 picks the decoder's options and the chunking, the rest
is the byte stream.  Anything but ProtocolError escaping is a crash, and so is
a record that re-encodes into bytes decoding to a different record.  A
RESERVE's request also goes through the target's validation.

    python tests/fuzz/fuzz_codec.py -max_total_time=60 WORKDIR tests/fuzz/corpus/codec
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fuzzlib import instrumented, main

with instrumented():
    from relocd.engine.reservation import ReservationRequest
    from relocd.errors import ProtocolError
    from relocd.protocol.codec import (
        EndOfStream,
        FrameDecoder,
        NeedData,
        Pages,
        decode_body,
        encode,
        parse_header,
    )
    from relocd.protocol.codes import OutcomeState, Role
    from relocd.protocol.records import (
        Commit,
        Config,
        Done,
        Go,
        Hello,
        Outcome,
        PagesHeader,
        Prepared,
        Query,
        Record,
        Reserve,
        Reserved,
        Resumed,
        Stop,
        VcpuState,
    )  # fmt: skip
    from relocd.protocol.state import Conversation, Step, allowed_steps

MAX_LENGTH = 1 << 20
NPAGES = 4096
ROLES = (Role.TARGET, Role.SOURCE, Role.QUERY, Role.TARGET)
MID = bytes(range(1, 17))

#: Our side's lines, so the peer's records reach deep states: the first one
#: the table allows is sent, each at most once (a cold migration, or a query).
OUR_LINES: list[tuple[Step, Callable[[Conversation], Record]]] = [
    (Step.HELLO_TARGET, lambda c: Hello.current(Role.TARGET)),
    (Step.HELLO_SOURCE, lambda c: Hello.current(Role.SOURCE, MID)),
    (Step.HELLO_QUERY, lambda c: Hello.current(Role.QUERY, MID)),
    (Step.RESERVE, lambda c: Reserve({"name": "x"})),
    (Step.RESERVED, lambda c: Reserved({"reservation": "x"})),
    (Step.CONFIG, lambda c: Config("(domain)")),
    (Step.STOP, lambda c: Stop(c.round)),
    (Step.VCPU_STATE, lambda c: VcpuState("sim", b"")),
    (Step.COMMIT, lambda c: Commit()),
    (Step.PREPARED, lambda c: Prepared()),
    (Step.GO, lambda c: Go()),
    (Step.RESUMED_OK, lambda c: Resumed(True, {})),
    (Step.DONE, lambda c: Done()),
    (Step.QUERY, lambda c: Query(MID)),
    (Step.OUTCOME, lambda c: Outcome(c.queried_id or MID, OutcomeState.PREPARED)),
]

OUR_HELLO = {Role.TARGET: Step.HELLO_TARGET, Role.SOURCE: Step.HELLO_SOURCE, Role.QUERY: Step.HELLO_QUERY}


def _answer(conversation: Conversation, said: set[Step]) -> None:
    """Send our side's next lines (what a well-behaved peer of the fuzzed one says)."""
    for _ in range(len(OUR_LINES)):
        allowed = set(allowed_steps(conversation.state, conversation.our_side))
        allowed -= {OUR_HELLO[r] for r in OUR_HELLO if r is not conversation.our_role}
        line = next(((s, make) for s, make in OUR_LINES if s in allowed and s not in said), None)
        if line is None:
            return
        said.add(line[0])
        conversation.send(line[1](conversation))


def _check_round_trip(record: Record) -> None:
    if isinstance(record, PagesHeader):
        return  # PAGES framing is covered by the decoder itself
    try:
        wire = encode(record)
    except ProtocolError as exc:
        assert not exc.remote, "encode() blamed the peer"
        return  # decodable but not sendable by us (e.g. a newer minor's extras): fine
    again = decode_body(parse_header(wire, MAX_LENGTH), wire[12:])
    assert again == record, f"round trip changed {record!r} into {again!r}"


def one_input(data: bytes) -> None:
    if not data:
        return
    mode, stream = data[0], data[1:]
    decoder = FrameDecoder(
        MAX_LENGTH,
        expect_preamble=not mode & 1,
        npages_limit=NPAGES if mode & 2 else None,
    )
    conversation = Conversation(ROLES[(mode >> 2) & 3])
    said: set[Step] = set()
    _answer(conversation, said)
    chunk = 1 + (mode >> 4) * 37  # 1 byte at a time up to 556-byte chunks
    try:
        for i in range(0, len(stream), chunk):
            decoder.receive_data(stream[i : i + chunk])
            _drain(decoder, conversation, said)
        decoder.receive_data(b"")
        _drain(decoder, conversation, said)
    except ProtocolError:
        pass


def _drain(decoder: FrameDecoder, conversation: Conversation, said: set[Step]) -> None:
    while True:
        event = decoder.next_event()
        if isinstance(event, (NeedData, EndOfStream)):
            return
        if isinstance(event, Pages):
            assert len(event.payload) == event.header.payload_len
            record: Record = event.header
        else:
            record = event
        _check_round_trip(record)
        if isinstance(record, Reserve):
            try:  # a peer's reservation request: malformed is a ProtocolError, nothing else
                ReservationRequest.from_wire(record.request)
            except ProtocolError:
                pass
        try:
            conversation.receive(record)
        except ProtocolError as exc:
            assert exc.remote, "a received record was blamed on us"
            raise
        _answer(conversation, said)


if __name__ == "__main__":
    main(one_input)
