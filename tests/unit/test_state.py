"""The conversation state machine, driven through real bytes over an in-memory link."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import numpy as np
import pytest

from relocd.errors import ProtocolError, Reason
from relocd.protocol.codec import (
    END_OF_STREAM,
    PREAMBLE,
    FrameDecoder,
    Pages,
    encode,
    encode_pages_header,
)
from relocd.protocol.records import (
    NO_MIGRATION_ID,
    PAGE_SIZE,
    Abort,
    ChannelEnd,
    Commit,
    Config,
    Digest,
    DigestAlgo,
    Done,
    EndRound,
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
from relocd.protocol.state import (
    TERMINAL,
    TRANSITIONS,
    Conversation,
    ConversationState,
    Side,
    Step,
)

S = ConversationState
MID = bytes(range(1, 17))
LIMIT = 1 << 20


class End:
    """One side of the link: its conversation and the decoder of what it receives."""

    def __init__(self, role: Role, *, savefile: bool = False) -> None:
        self.conv = Conversation(role, savefile=savefile)
        self.decoder = FrameDecoder(LIMIT)
        self.decoder.receive_data(PREAMBLE)
        self.received: list[Record] = []


class Link:
    """Two conversations and the bytes between them; no sockets."""

    def __init__(self, initiator_role: Role = Role.SOURCE) -> None:
        self.src = End(initiator_role)
        self.tgt = End(Role.TARGET)

    def _peer(self, sender: End) -> End:
        return self.tgt if sender is self.src else self.src

    def send(self, sender: End, record: Record) -> Record:
        sender.conv.send(record)
        receiver = self._peer(sender)
        receiver.decoder.receive_data(encode(record))
        event = receiver.decoder.next_event()
        assert isinstance(event, Record)
        receiver.conv.receive(event)
        receiver.received.append(event)
        return event

    def send_pages(self, sender: End, rnd: int, data: list[int], zero: list[int]) -> Pages:
        data_pfns, zero_pfns = np.array(data, np.uint64), np.array(zero, np.uint64)
        sender.conv.send(PagesHeader(rnd, data_pfns, zero_pfns))
        payload = b"".join(bytes([pfn % 256]) * PAGE_SIZE for pfn in data)
        receiver = self._peer(sender)
        receiver.decoder.receive_data(encode_pages_header(rnd, data_pfns, zero_pfns) + payload)
        event = receiver.decoder.next_event()
        assert isinstance(event, Pages) and event.payload == payload
        receiver.conv.receive(event.header)
        return event

    def hello(self, target_first: bool = False) -> None:
        ours = Hello.current(self.src.conv.our_role, MID, "src-host")
        theirs = Hello.current(Role.TARGET, NO_MIGRATION_ID, "tgt-host")
        if target_first:
            self.send(self.tgt, theirs)
            self.send(self.src, ours)
        else:
            self.send(self.src, ours)
            self.send(self.tgt, theirs)

    def reserve(self) -> None:
        self.hello()
        self.send(self.src, Reserve({"name": "vm1", "memory_bytes": 1 << 20, "live": True}))
        self.send(self.tgt, Reserved({"id": "r-1", "expires_ms": 30000}))
        self.send(self.src, Config("(domain (name vm1) (memory 1))"))

    def stop_and_commit(self, rnd: int, *, digest: bool = True) -> None:
        self.send(self.src, Stop(rnd))
        self.send_pages(self.src, rnd, [0, 7], [3])
        self.send(self.src, VcpuState("sim", b"\x00state"))
        if digest:
            self.send(self.src, Digest(DigestAlgo.SHA256, bytes(32)))
        self.send(self.src, Commit())

    def states(self) -> tuple[ConversationState, ConversationState]:
        return self.src.conv.state, self.tgt.conv.state


def test_live_migration_flow() -> None:
    link = Link()
    link.hello(target_first=True)
    assert link.tgt.conv.peer_hello is not None and link.tgt.conv.peer_hello.node == "src-host"
    link.send(link.src, Reserve({"name": "vm1"}))
    link.send(link.tgt, Reserved({"id": "r-1"}))
    link.send(link.src, Config("(domain)"))
    link.send_pages(link.src, 1, [0, 1, 2], [3, 4])
    link.send_pages(link.src, 1, [5], [])
    link.send(link.src, EndRound(1, 6, 2))
    link.send(link.src, EndRound(2, 0, 0))  # a round with nothing dirty
    link.send_pages(link.src, 3, [1, 2], [])
    link.send(link.src, EndRound(3, 2, 1))
    link.stop_and_commit(4)
    assert link.states() == (S.COMMITTED, S.COMMITTED)
    link.send(link.tgt, Prepared())
    link.send(link.src, Go())
    link.send(link.tgt, Resumed(True, {"announce": "sent 3 ARP"}))
    link.send(link.src, Done())
    for end in (link.src, link.tgt):
        assert end.conv.state is S.DONE
        assert end.conv.done and end.conv.completed and not end.conv.aborted
    assert [type(r) for r in link.tgt.received][-3:] == [Commit, Go, Done]


def test_non_live_migration_flow() -> None:
    link = Link()
    link.reserve()
    link.stop_and_commit(1, digest=False)
    link.send(link.tgt, Prepared())
    link.send(link.src, Go())
    link.send(link.tgt, Resumed(True, {}))
    link.send(link.src, Done())
    assert link.states() == (S.DONE, S.DONE)


def test_refused_flow() -> None:
    link = Link()
    link.hello()
    link.send(link.src, Reserve({"name": "vm1"}))
    link.send(link.tgt, Refuse(Reason.NO_MEMORY, "only 512 MiB free"))
    assert link.states() == (S.REFUSED, S.REFUSED)
    assert link.src.conv.done and link.src.conv.aborted
    with pytest.raises(ProtocolError):
        link.send(link.src, Config("(domain)"))
    with pytest.raises(ProtocolError):  # not even ABORT after the end
        link.send(link.src, Abort(Reason.CANCELLED, "x"))


def test_source_aborts_during_precopy() -> None:
    link = Link()
    link.reserve()
    link.send_pages(link.src, 1, [1], [])
    link.send(link.src, Abort(Reason.CANCELLED, "cancelled by the operator"))
    assert link.states() == (S.ABORTED, S.ABORTED)
    assert link.tgt.conv.aborted


def test_target_aborts_instead_of_prepared() -> None:
    link = Link()
    link.reserve()
    link.stop_and_commit(1)
    link.send(link.tgt, Abort(Reason.VERIFY, "memory digest mismatch"))
    assert link.states() == (S.ABORTED, S.ABORTED)


def test_source_aborts_after_prepared() -> None:
    link = Link()
    link.reserve()
    link.stop_and_commit(1)
    link.send(link.tgt, Prepared())
    link.send(link.src, Abort(Reason.SHUTDOWN, "daemon stopping"))
    assert link.states() == (S.ABORTED, S.ABORTED)


def test_no_abort_after_go() -> None:
    link = Link()
    link.reserve()
    link.stop_and_commit(1)
    link.send(link.tgt, Prepared())
    link.send(link.src, Go())
    with pytest.raises(ProtocolError) as local:
        link.tgt.conv.send(Abort(Reason.DRIVER_ERROR, "x"))
    assert local.value.remote is False
    with pytest.raises(ProtocolError) as remote:
        link.src.conv.receive(Abort(Reason.DRIVER_ERROR, "x"))
    assert remote.value.remote is True
    assert link.states() == (S.GO_SENT, S.GO_SENT)


def test_failed_resume_forbids_done() -> None:
    link = Link()
    link.reserve()
    link.stop_and_commit(1)
    link.send(link.tgt, Prepared())
    link.send(link.src, Go())
    link.send(link.tgt, Resumed(False, {"error": "resume failed"}))
    assert link.states() == (S.RESUME_FAILED, S.RESUME_FAILED)
    assert link.src.conv.aborted and link.src.conv.done
    with pytest.raises(ProtocolError):
        link.src.conv.send(Done())


def test_recovery_query_then_go() -> None:
    link = Link(Role.QUERY)
    link.hello()
    assert link.states() == (S.QUERYING, S.QUERYING)
    link.send(link.src, Query(MID))
    link.send(link.tgt, Outcome(MID, OutcomeState.PREPARED))
    link.send(link.src, Go())
    link.send(link.tgt, Resumed(True, {}))
    link.send(link.src, Done())
    assert link.states() == (S.DONE, S.DONE)


def test_recovery_query_then_abort() -> None:
    link = Link(Role.QUERY)
    link.hello(target_first=True)
    link.send(link.src, Query(MID))
    link.send(link.tgt, Outcome(MID, OutcomeState.PREPARED))
    link.send(link.src, Abort(Reason.CANCELLED, "keeping the source copy"))
    assert link.states() == (S.ABORTED, S.ABORTED)


def test_recovery_query_finds_it_resumed_then_done() -> None:
    link = Link(Role.QUERY)
    link.hello()
    link.send(link.src, Query(MID))
    link.send(link.tgt, Outcome(MID, OutcomeState.RESUMED))
    link.send(link.src, Done())
    assert link.states() == (S.DONE, S.DONE)


def test_query_conversation_cannot_migrate() -> None:
    link = Link(Role.QUERY)
    link.hello()
    with pytest.raises(ProtocolError):
        link.send(link.src, Reserve({"name": "vm1"}))


def test_outcome_must_answer_the_queried_id() -> None:
    link = Link(Role.QUERY)
    link.hello()
    link.send(link.src, Query(MID))
    with pytest.raises(ProtocolError, match="different migration"):
        link.tgt.conv.send(Outcome(bytes(16), OutcomeState.UNKNOWN))
    with pytest.raises(ProtocolError, match="different migration"):
        link.src.conv.receive(Outcome(bytes(16), OutcomeState.UNKNOWN))


def test_savefile_stream() -> None:
    writer = Conversation(Role.SOURCE, savefile=True)
    reader = Conversation(Role.TARGET, savefile=True)
    assert Conversation(Role.TARGET, savefile=True).state is S.SAVE_CONFIG
    file = bytearray(PREAMBLE)
    records: list[Record] = [
        Config("(domain)"),
        EndRound(1, 0, 0),
        Stop(2),
        VcpuState("kvm", b"regs"),
        Digest(DigestAlgo.SHA256, bytes(range(32))),
        Commit(),
    ]
    for record in records[:3]:
        writer.send(record)
        file += encode(record)
    pages = PagesHeader(2, np.array([1, 2], np.uint64), np.array([], np.uint64))
    writer.send(pages)
    file += encode_pages_header(2, pages.data_pfns, pages.zero_pfns) + bytes(2 * PAGE_SIZE)
    for record in records[3:]:
        writer.send(record)
        file += encode(record)
    assert writer.state is S.SAVED and writer.completed
    decoder = FrameDecoder(LIMIT)
    decoder.receive_data(bytes(file))
    decoder.receive_data(b"")
    while (event := decoder.next_event()) is not END_OF_STREAM:
        assert isinstance(event, Pages | Record)
        reader.receive(event.header if isinstance(event, Pages) else event)
    assert reader.state is S.SAVED and reader.done and not reader.aborted


def test_savefile_requires_digest_and_has_no_handshake() -> None:
    writer = Conversation(Role.SOURCE, savefile=True)
    with pytest.raises(ProtocolError):
        writer.send(Hello.current(Role.SOURCE, MID))
    for record in (Config("x"), Stop(1), VcpuState("sim", b"")):
        writer.send(record)
    with pytest.raises(ProtocolError):
        writer.send(Commit())
    with pytest.raises(ProtocolError):
        writer.send(Abort(Reason.CANCELLED, ""))
    with pytest.raises(ValueError):
        Conversation(Role.QUERY, savefile=True)


def test_round_numbers_are_checked() -> None:
    link = Link()
    link.reserve()
    with pytest.raises(ProtocolError, match="round 2, expected 1"):
        link.src.conv.send(EndRound(2, 0, 0))
    link.send(link.src, EndRound(1, 0, 0))
    with pytest.raises(ProtocolError, match="expected 2") as info:
        link.tgt.conv.receive(PagesHeader(1, np.array([1], np.uint64), np.array([], np.uint64)))
    assert info.value.remote is True
    with pytest.raises(ProtocolError, match="expected 2"):
        link.src.conv.send(Stop(3))
    assert link.src.conv.round == 2


def test_hello_content_checks() -> None:
    source = Conversation(Role.SOURCE)
    with pytest.raises(ProtocolError, match="our role") as info:
        source.send(Hello.current(Role.QUERY, MID))
    assert info.value.remote is False
    with pytest.raises(ProtocolError, match="all zero"):
        source.receive(Hello.current(Role.TARGET, MID))
    with pytest.raises(ProtocolError):  # a second "source" answering us
        source.receive(Hello.current(Role.SOURCE, MID))
    target = Conversation(Role.TARGET)
    with pytest.raises(ProtocolError):
        target.receive(Hello.current(Role.TARGET, NO_MIGRATION_ID))
    assert source.state is S.START and target.state is S.START


def test_send_accepts_record_types_and_classes() -> None:
    conv = Conversation(Role.TARGET)
    conv.send(RecordType.HELLO)
    conv.receive(Hello.current(Role.SOURCE, MID))
    conv.receive(Reserve({}))
    conv.send(Reserved)
    assert conv.state is S.RESERVED
    with pytest.raises(ProtocolError, match="RESUMED needs the record"):
        Conversation(Role.TARGET).send(RecordType.RESUMED)
    with pytest.raises(ProtocolError):
        conv.receive(RecordType.CONFIG)  # type: ignore[arg-type]


def test_errors_leave_the_state_alone_so_we_can_abort() -> None:
    link = Link()
    link.reserve()
    with pytest.raises(ProtocolError) as info:
        link.tgt.conv.receive(Commit())
    assert "may not send COMMIT in state PRECOPY" in info.value.message
    assert link.tgt.conv.state is S.PRECOPY
    link.send(link.tgt, Abort(Reason.PROTOCOL, info.value.message))
    assert link.states() == (S.ABORTED, S.ABORTED)


# -- exhaustive: every triple outside the table is refused, every one inside accepted --


def sample(step: Step, conv: Conversation) -> Record:
    """A valid record for ``step``, given the sender's conversation (for rounds)."""
    rnd = conv.round
    return {
        Step.HELLO_SOURCE: Hello.current(Role.SOURCE, MID, "s"),
        Step.HELLO_QUERY: Hello.current(Role.QUERY, MID, "q"),
        Step.HELLO_TARGET: Hello.current(Role.TARGET, NO_MIGRATION_ID, "t"),
        Step.HELLO_CHANNEL: Hello.current(Role.CHANNEL, MID, "c"),
        Step.JOIN: Join(bytes(16), 1, 2),
        Step.JOINED: Joined(),
        Step.CHANNEL_END: ChannelEnd(0),
        Step.RESERVE: Reserve({"name": "vm1"}),
        Step.RESERVED: Reserved({"id": "r"}),
        Step.REFUSE: Refuse(Reason.BUSY, "busy"),
        Step.CONFIG: Config("(domain)"),
        Step.PAGES: PagesHeader(rnd, np.array([1], np.uint64), np.array([2], np.uint64)),
        Step.END_ROUND: EndRound(rnd, 2, 0),
        Step.STOP: Stop(rnd),
        Step.VCPU_STATE: VcpuState("sim", b""),
        Step.DIGEST: Digest(DigestAlgo.SHA256, bytes(32)),
        Step.COMMIT: Commit(),
        Step.PREPARED: Prepared(),
        Step.GO: Go(),
        Step.RESUMED_OK: Resumed(True, {}),
        Step.RESUMED_FAILED: Resumed(False, {}),
        Step.DONE: Done(),
        Step.STREAM: StreamChunk(b"chunk"),
        Step.ABORT: Abort(Reason.CANCELLED, "stop"),
        Step.QUERY: Query(MID),
        Step.OUTCOME: Outcome(MID, OutcomeState.PREPARED),
    }[step]


Path = list[tuple[Side, Step]]


def shortest_paths(start: ConversationState) -> dict[ConversationState, Path]:
    paths: dict[ConversationState, Path] = {start: []}
    todo = deque([start])
    while todo:
        state = todo.popleft()
        for (st, side, step), nxt in TRANSITIONS.items():
            if st is state and nxt not in paths:
                paths[nxt] = [*paths[state], (side, step)]
                todo.append(nxt)
    return paths


MIGRATION_PATHS = shortest_paths(S.START)
SAVEFILE_PATHS = shortest_paths(S.SAVE_CONFIG)


def drive(path: Path, *, savefile: bool) -> dict[Side, Conversation]:
    """An initiator and a responder conversation, both walked down ``path``."""
    steps = {step for _, step in path}
    role = Role.QUERY if Step.HELLO_QUERY in steps else Role.CHANNEL if Step.HELLO_CHANNEL in steps else Role.SOURCE
    convs = {
        Side.INITIATOR: Conversation(role, savefile=savefile),
        Side.RESPONDER: Conversation(Role.TARGET, savefile=savefile),
    }
    for sender, step in path:
        record = sample(step, convs[sender])
        for side, conv in convs.items():
            (conv.send if side is sender else conv.receive)(record)
    return convs


def all_cases() -> Iterator[tuple[ConversationState, bool]]:
    for state in MIGRATION_PATHS:
        yield state, False
    for state in SAVEFILE_PATHS:
        yield state, True


def test_every_state_is_reachable() -> None:
    assert set(MIGRATION_PATHS) | set(SAVEFILE_PATHS) == set(ConversationState)
    assert not set(MIGRATION_PATHS) & set(SAVEFILE_PATHS)


def test_terminal_states_have_no_way_out_and_others_do() -> None:
    sources = {st for st, _, _ in TRANSITIONS}
    assert not sources & TERMINAL
    assert sources | TERMINAL == set(ConversationState)


@pytest.mark.parametrize(("state", "savefile"), list(all_cases()), ids=lambda v: str(v))
def test_every_step_outside_the_table_is_refused(state: ConversationState, savefile: bool) -> None:
    path = (SAVEFILE_PATHS if savefile else MIGRATION_PATHS)[state]
    refused = 0
    for sender in Side:
        for step in Step:
            if (state, sender, step) in TRANSITIONS:
                continue
            convs = drive(path, savefile=savefile)
            receiver_side = Side.RESPONDER if sender is Side.INITIATOR else Side.INITIATOR
            record = sample(step, convs[sender])
            with pytest.raises(ProtocolError) as local:
                convs[sender].send(record)
            assert local.value.remote is False
            with pytest.raises(ProtocolError) as remote:
                convs[receiver_side].receive(record)
            assert remote.value.remote is True
            assert convs[sender].state is state and convs[receiver_side].state is state
            refused += 1
    assert refused > 0


@pytest.mark.parametrize(("state", "savefile"), list(all_cases()), ids=lambda v: str(v))
def test_every_step_inside_the_table_is_accepted(state: ConversationState, savefile: bool) -> None:
    path = (SAVEFILE_PATHS if savefile else MIGRATION_PATHS)[state]
    for (st, sender, step), nxt in TRANSITIONS.items():
        if st is not state:
            continue
        if step is Step.HELLO_QUERY and any(s is Step.HELLO_SOURCE for _, s in path):
            continue  # the initiator already said it is a source
        convs = drive([*path, (sender, step)], savefile=savefile)
        assert {conv.state for conv in convs.values()} == {nxt}


def test_out_of_turn_type_is_refused_from_the_header_alone() -> None:
    from relocd.errors import ProtocolError
    from relocd.protocol.records import RecordType, Role
    from relocd.protocol.state import Conversation

    target = Conversation(Role.TARGET)
    target.check_incoming_type(RecordType.HELLO)  # the one thing a source may send first
    for rtype in (RecordType.PAGES, RecordType.GO, RecordType.COMMIT, RecordType.CONFIG):
        try:
            target.check_incoming_type(rtype)
        except ProtocolError as exc:
            assert exc.remote
        else:
            raise AssertionError(f"{rtype.name} accepted before HELLO")
