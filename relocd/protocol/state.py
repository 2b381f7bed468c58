"""The migration conversation as one transition table (h11 ``_state.py`` style).

Both ends keep a ``Conversation`` and pass every record they send or receive
through it.  A (state, sender, step) triple missing from ``TRANSITIONS`` is a
protocol error: ``remote=False`` when we were about to send it (our bug),
``remote=True`` when the peer sent it.

The sender is a ``Side``: the INITIATOR (role SOURCE, QUERY or CHANNEL, the side that
connects or writes the savefile) or the RESPONDER (role TARGET).  The table
keys on a ``Step``, which is the record type, refined where a record's content
picks the path: HELLO by the sender's role, RESUMED by its ok flag.

Beyond the table, a few cross-record checks: each side's HELLO role, the
responder's all-zero migration id, round numbers (precopy rounds count from
1, END_ROUND closes the current round, STOP and the stop-and-copy PAGES carry
the next number), and OUTCOME answering the QUERY's migration id.
"""

from __future__ import annotations

import enum
from typing import Final

from relocd.errors import ProtocolError
from relocd.protocol.codes import RecordType, Role
from relocd.protocol.records import (
    NO_MIGRATION_ID,
    EndRound,
    Hello,
    Outcome,
    PagesHeader,
    Query,
    Record,
    Resumed,
    Stop,
)


class Side(enum.Enum):
    INITIATOR = "initiator"  # role SOURCE, QUERY or CHANNEL
    RESPONDER = "responder"  # role TARGET


class Step(enum.Enum):
    """What the table keys on: a record type, or a record type and its content."""

    HELLO_SOURCE = "HELLO(role=SOURCE)"
    HELLO_QUERY = "HELLO(role=QUERY)"
    HELLO_TARGET = "HELLO(role=TARGET)"
    HELLO_CHANNEL = "HELLO(role=CHANNEL)"
    RESERVE = "RESERVE"
    RESERVED = "RESERVED"
    REFUSE = "REFUSE"
    CONFIG = "CONFIG"
    JOIN = "JOIN"
    JOINED = "JOINED"
    CHANNEL_END = "CHANNEL_END"
    PAGES = "PAGES"
    STREAM = "STREAM"
    END_ROUND = "END_ROUND"
    STOP = "STOP"
    VCPU_STATE = "VCPU_STATE"
    DIGEST = "DIGEST"
    COMMIT = "COMMIT"
    PREPARED = "PREPARED"
    GO = "GO"
    RESUMED_OK = "RESUMED(ok=1)"
    RESUMED_FAILED = "RESUMED(ok=0)"
    DONE = "DONE"
    ABORT = "ABORT"
    QUERY = "QUERY"
    OUTCOME = "OUTCOME"


class ConversationState(enum.Enum):
    # handshake
    START = "START"
    SOURCE_HELLO = "SOURCE_HELLO"  # the initiator's HELLO(SOURCE) only
    QUERY_HELLO = "QUERY_HELLO"  # the initiator's HELLO(QUERY) only
    TARGET_HELLO = "TARGET_HELLO"  # the responder's HELLO only
    # migration
    RESERVING = "RESERVING"  # both HELLOs: RESERVE next
    RESERVE_SENT = "RESERVE_SENT"
    RESERVED = "RESERVED"  # CONFIG next
    PRECOPY = "PRECOPY"  # between rounds
    ROUND = "ROUND"  # inside a round (PAGES seen)
    STOPPED = "STOPPED"  # stop-and-copy: PAGES*, then VCPU_STATE
    VCPU_SENT = "VCPU_SENT"
    DIGEST_SENT = "DIGEST_SENT"
    COMMITTED = "COMMITTED"
    PREPARED = "PREPARED"
    GO_SENT = "GO_SENT"  # no ABORT from here on
    RESUMED = "RESUMED"
    # recovery query
    QUERYING = "QUERYING"  # both HELLOs: QUERY next
    QUERY_SENT = "QUERY_SENT"
    ANSWERED = "ANSWERED"  # GO, DONE, ABORT, or close
    # an extra page channel of a migration (feature CHANNELS)
    CHANNEL_HELLO = "CHANNEL_HELLO"  # the initiator's HELLO(CHANNEL) only
    JOINING = "JOINING"  # both HELLOs: JOIN next
    JOIN_SENT = "JOIN_SENT"
    CHANNEL_OPEN = "CHANNEL_OPEN"  # joined: PAGES*, then CHANNEL_END
    # savefile stream
    SAVE_CONFIG = "SAVE_CONFIG"
    SAVE_PRECOPY = "SAVE_PRECOPY"
    SAVE_ROUND = "SAVE_ROUND"
    SAVE_STOPPED = "SAVE_STOPPED"
    SAVE_VCPU = "SAVE_VCPU"
    SAVE_DIGEST = "SAVE_DIGEST"
    SAVE_STREAM = "SAVE_STREAM"  # a stream domain's savefile: STREAM*, then VCPU_STATE
    SAVE_STREAM_VCPU = "SAVE_STREAM_VCPU"
    # terminal
    DONE = "DONE"  # the domain moved; the source copy is gone
    SAVED = "SAVED"  # a complete savefile stream
    CHANNEL_DONE = "CHANNEL_DONE"  # an extra channel carried all its pages
    REFUSED = "REFUSED"
    ABORTED = "ABORTED"
    RESUME_FAILED = "RESUME_FAILED"  # the source keeps (and resumes) its copy


S = ConversationState
I, R = Side.INITIATOR, Side.RESPONDER

#: States in which either side may still ABORT (everything before GO).
ABORTABLE: Final = frozenset(
    {
        S.START, S.SOURCE_HELLO, S.QUERY_HELLO, S.TARGET_HELLO,
        S.RESERVING, S.RESERVE_SENT, S.RESERVED, S.PRECOPY, S.ROUND, S.STOPPED,
        S.VCPU_SENT, S.DIGEST_SENT, S.COMMITTED, S.PREPARED,
        S.QUERYING, S.QUERY_SENT, S.ANSWERED,
        S.CHANNEL_HELLO, S.JOINING, S.JOIN_SENT, S.CHANNEL_OPEN,
    }
)  # fmt: skip

TERMINAL: Final = frozenset({S.DONE, S.SAVED, S.CHANNEL_DONE, S.REFUSED, S.ABORTED, S.RESUME_FAILED})
FAILED: Final = frozenset({S.REFUSED, S.ABORTED, S.RESUME_FAILED})

#: (state, sender, step) -> next state.  Anything else is a protocol error.
TRANSITIONS: Final[dict[tuple[ConversationState, Side, Step], ConversationState]] = {
    # both sides say HELLO first, in either order
    (S.START, I, Step.HELLO_SOURCE): S.SOURCE_HELLO,
    (S.START, I, Step.HELLO_QUERY): S.QUERY_HELLO,
    (S.START, R, Step.HELLO_TARGET): S.TARGET_HELLO,
    (S.SOURCE_HELLO, R, Step.HELLO_TARGET): S.RESERVING,
    (S.QUERY_HELLO, R, Step.HELLO_TARGET): S.QUERYING,
    (S.TARGET_HELLO, I, Step.HELLO_SOURCE): S.RESERVING,
    (S.TARGET_HELLO, I, Step.HELLO_QUERY): S.QUERYING,
    (S.START, I, Step.HELLO_CHANNEL): S.CHANNEL_HELLO,
    (S.CHANNEL_HELLO, R, Step.HELLO_TARGET): S.JOINING,
    (S.TARGET_HELLO, I, Step.HELLO_CHANNEL): S.JOINING,
    # reservation
    (S.RESERVING, I, Step.RESERVE): S.RESERVE_SENT,
    (S.RESERVE_SENT, R, Step.RESERVED): S.RESERVED,
    (S.RESERVE_SENT, R, Step.REFUSE): S.REFUSED,
    (S.RESERVED, I, Step.CONFIG): S.PRECOPY,
    # precopy rounds (zero or more), then stop-and-copy
    (S.PRECOPY, I, Step.PAGES): S.ROUND,
    (S.PRECOPY, I, Step.STREAM): S.ROUND,
    (S.PRECOPY, I, Step.END_ROUND): S.PRECOPY,
    (S.ROUND, I, Step.PAGES): S.ROUND,
    (S.ROUND, I, Step.STREAM): S.ROUND,
    (S.ROUND, I, Step.END_ROUND): S.PRECOPY,
    (S.PRECOPY, I, Step.STOP): S.STOPPED,
    (S.STOPPED, I, Step.PAGES): S.STOPPED,
    (S.STOPPED, I, Step.STREAM): S.STOPPED,
    (S.STOPPED, I, Step.VCPU_STATE): S.VCPU_SENT,
    (S.VCPU_SENT, I, Step.DIGEST): S.DIGEST_SENT,
    (S.VCPU_SENT, I, Step.COMMIT): S.COMMITTED,
    (S.DIGEST_SENT, I, Step.COMMIT): S.COMMITTED,
    # handoff
    (S.COMMITTED, R, Step.PREPARED): S.PREPARED,
    (S.PREPARED, I, Step.GO): S.GO_SENT,
    (S.GO_SENT, R, Step.RESUMED_OK): S.RESUMED,
    (S.GO_SENT, R, Step.RESUMED_FAILED): S.RESUME_FAILED,
    (S.RESUMED, I, Step.DONE): S.DONE,
    # recovery query: the answer, then GO (as above), DONE, ABORT, or close
    (S.QUERYING, I, Step.QUERY): S.QUERY_SENT,
    (S.QUERY_SENT, R, Step.OUTCOME): S.ANSWERED,
    (S.ANSWERED, I, Step.GO): S.GO_SENT,
    (S.ANSWERED, I, Step.DONE): S.DONE,  # after OUTCOME(RESUMED): source copy gone
    # an extra page channel: JOIN, then its share of the pages (any round,
    # never going back), then CHANNEL_END; control records stay on channel 0
    (S.JOINING, I, Step.JOIN): S.JOIN_SENT,
    (S.JOIN_SENT, R, Step.JOINED): S.CHANNEL_OPEN,
    (S.JOIN_SENT, R, Step.REFUSE): S.REFUSED,
    (S.CHANNEL_OPEN, I, Step.PAGES): S.CHANNEL_OPEN,
    (S.CHANNEL_OPEN, I, Step.CHANNEL_END): S.CHANNEL_DONE,
    # savefile stream: no handshake, no handoff, DIGEST required (page form)
    (S.SAVE_CONFIG, I, Step.CONFIG): S.SAVE_PRECOPY,
    (S.SAVE_PRECOPY, I, Step.PAGES): S.SAVE_ROUND,
    (S.SAVE_PRECOPY, I, Step.END_ROUND): S.SAVE_PRECOPY,
    (S.SAVE_ROUND, I, Step.PAGES): S.SAVE_ROUND,
    (S.SAVE_ROUND, I, Step.END_ROUND): S.SAVE_PRECOPY,
    (S.SAVE_PRECOPY, I, Step.STOP): S.SAVE_STOPPED,
    (S.SAVE_STOPPED, I, Step.PAGES): S.SAVE_STOPPED,
    (S.SAVE_STOPPED, I, Step.VCPU_STATE): S.SAVE_VCPU,
    (S.SAVE_VCPU, I, Step.DIGEST): S.SAVE_DIGEST,
    (S.SAVE_DIGEST, I, Step.COMMIT): S.SAVED,
    # a stream domain's savefile (non-live): its driver's stream where the
    # pages would be, state and memory inside it, so no DIGEST
    (S.SAVE_STOPPED, I, Step.STREAM): S.SAVE_STREAM,
    (S.SAVE_STREAM, I, Step.STREAM): S.SAVE_STREAM,
    (S.SAVE_STREAM, I, Step.VCPU_STATE): S.SAVE_STREAM_VCPU,
    (S.SAVE_STREAM_VCPU, I, Step.COMMIT): S.SAVED,
    # either side may give up before GO
    **{(state, side, Step.ABORT): S.ABORTED for state in ABORTABLE for side in Side},
}

_PLAIN_STEPS: Final = {
    rtype: Step[rtype.name] for rtype in RecordType if rtype.name in Step.__members__
}
_HELLO_STEPS: Final = {
    Role.SOURCE: Step.HELLO_SOURCE,
    Role.QUERY: Step.HELLO_QUERY,
    Role.TARGET: Step.HELLO_TARGET,
    Role.CHANNEL: Step.HELLO_CHANNEL,
}


def allowed_steps(state: ConversationState, sender: Side) -> list[Step]:
    """The steps ``sender`` may take in ``state``, in table order."""
    return [step for (st, side, step) in TRANSITIONS if st is state and side is sender]


class Conversation:
    """One end of a conversation: checks every record sent and received."""

    def __init__(self, our_role: Role, *, savefile: bool = False) -> None:
        self.our_role = Role(our_role)
        if savefile and self.our_role in (Role.QUERY, Role.CHANNEL):
            raise ValueError("a savefile is written by a SOURCE and read by a TARGET")
        self.our_side = Side.RESPONDER if self.our_role is Role.TARGET else Side.INITIATOR
        self.peer_side = Side.INITIATOR if self.our_side is Side.RESPONDER else Side.RESPONDER
        self.savefile = savefile
        self.state = S.SAVE_CONFIG if savefile else S.START
        self.peer_hello: Hello | None = None
        #: The round the next PAGES / END_ROUND / STOP must carry.
        self.round = 1
        self.queried_id: bytes | None = None

    @property
    def done(self) -> bool:
        """No record may flow either way any more (success or not)."""
        return self.state in TERMINAL

    @property
    def aborted(self) -> bool:
        """Ended without the domain moving: refused, aborted, or resume failed."""
        return self.state in FAILED

    @property
    def completed(self) -> bool:
        """Ended with the domain moved (DONE), a whole savefile (SAVED) or a channel's pages all sent."""
        return self.state in (S.DONE, S.SAVED, S.CHANNEL_DONE)

    def send(self, item: Record | RecordType | type[Record]) -> ConversationState:
        """Record that we send ``item``; ProtocolError(remote=False) if we may not."""
        return self._advance(self.our_side, item, remote=False)

    def receive(self, record: Record) -> ConversationState:
        """Record that the peer sent ``record``; ProtocolError(remote=True) if it may not."""
        if not isinstance(record, Record):
            raise ProtocolError(f"receive() needs a record, got {record!r}", remote=False)
        return self._advance(self.peer_side, record, remote=True)

    def check_incoming_type(self, rtype: RecordType) -> None:
        """Refuse a record from its header alone, before its body is read.

        A record type the peer may not send now is a protocol error whatever
        its body says, so a reader can stop before buffering a single body
        byte (receive() still checks the whole record afterwards).
        """
        if rtype is RecordType.HELLO:
            candidates = list(_HELLO_STEPS.values())
        elif rtype is RecordType.RESUMED:
            candidates = [Step.RESUMED_OK, Step.RESUMED_FAILED]
        else:
            candidates = [_PLAIN_STEPS[rtype]]
        if not any((self.state, self.peer_side, step) in TRANSITIONS for step in candidates):
            expected = " or ".join(s.value for s in allowed_steps(self.state, self.peer_side))
            raise ProtocolError(
                f"peer may not send {rtype.name} in state {self.state.value}"
                f" (expected {expected or 'nothing'})",
                remote=True,
            )

    def _advance(
        self, sender: Side, item: Record | RecordType | type[Record], *, remote: bool
    ) -> ConversationState:
        record = item if isinstance(item, Record) else None
        step = self._step_of(item, record)
        target = TRANSITIONS.get((self.state, sender, step))
        if target is None:
            who = "peer" if remote else "we"
            expected = " or ".join(s.value for s in allowed_steps(self.state, sender))
            raise ProtocolError(
                f"{who} may not send {step.value} in state {self.state.value}"
                f" (expected {expected or 'nothing'})",
                remote=remote,
            )
        if record is not None:
            self._check_content(sender, record, remote=remote)
        if isinstance(record, EndRound) or (record is None and step is Step.END_ROUND):
            self.round += 1
        self.state = target
        return target

    def _step_of(self, item: object, record: Record | None) -> Step:
        if isinstance(item, RecordType):
            rtype = item
        elif isinstance(item, type) and issubclass(item, Record) and hasattr(item, "TYPE"):
            rtype = item.TYPE
        elif record is not None:
            rtype = record.TYPE
        else:
            raise ProtocolError(f"not a record or record type: {item!r}", remote=False)
        if rtype is RecordType.HELLO:
            if isinstance(record, Hello):
                return _HELLO_STEPS[Role(record.role)]
            return _HELLO_STEPS[self.our_role]  # only send() passes a bare type
        if rtype is RecordType.RESUMED:
            if not isinstance(record, Resumed):
                raise ProtocolError("RESUMED needs the record: ok picks the next state", remote=False)
            return Step.RESUMED_OK if record.ok else Step.RESUMED_FAILED
        return _PLAIN_STEPS[rtype]

    def _check_content(self, sender: Side, record: Record, *, remote: bool) -> None:
        def fail(problem: str) -> ProtocolError:
            return ProtocolError(f"{record.TYPE.name}: {problem}", remote=remote)

        if isinstance(record, Hello):
            if not remote and record.role != self.our_role:
                raise fail(f"our role is {self.our_role.name}, not {Role(record.role).name}")
            if sender is Side.RESPONDER and record.migration_id != NO_MIGRATION_ID:
                raise fail("the responder's migration id must be all zero")
            if remote:
                self.peer_hello = record
        elif isinstance(record, PagesHeader) and self.state is S.CHANNEL_OPEN:
            # An extra channel carries no END_ROUND: its rounds only go forward.
            if record.round < self.round:
                raise fail(f"round {record.round} after round {self.round}")
            self.round = record.round
        elif isinstance(record, PagesHeader | EndRound | Stop):
            if record.round != self.round:
                raise fail(f"round {record.round}, expected {self.round}")
        elif isinstance(record, Query):
            self.queried_id = record.migration_id
        elif isinstance(record, Outcome) and record.migration_id != self.queried_id:
            raise fail("answers a different migration id than the QUERY asked")
