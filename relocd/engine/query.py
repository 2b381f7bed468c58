"""The QUERY client: one piece of code asks a target what became of a migration.

Used by a source whose link dropped after GO, by a source that gave up
before GO and must see a prepared copy dropped, and by a restarted daemon
finishing either.  None of them gives up: a peer that does not answer is
asked again, with backoff, until it does (a restart carries on from the
journal).  What each caller does with the answer is its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid as uuidlib
from collections.abc import Awaitable, Callable

import structlog

from relocd.engine.handshake import hello
from relocd.engine.journal import Journal
from relocd.engine.stream import RecordChannel
from relocd.errors import ProtocolError, Reason, RelocdError
from relocd.protocol.records import Abort, Outcome, OutcomeState, Query, Role

log = structlog.get_logger("relocd.query")

Reconnect = Callable[[], Awaitable[RecordChannel]]

#: First and longest wait between two questions to a silent peer.
FIRST_DELAY_S = 0.2
MAX_DELAY_S = 30.0


class Backoff:
    """Doubling delays from ``first`` to ``cap`` seconds."""

    def __init__(self, first: float = FIRST_DELAY_S, cap: float = MAX_DELAY_S) -> None:
        self.delay = first
        self.cap = cap

    async def wait(self) -> None:
        await asyncio.sleep(self.delay)
        self.delay = min(self.delay * 2, self.cap)


async def ask(reconnect: Reconnect, migration_id: str) -> tuple[OutcomeState, RecordChannel]:
    """Open a QUERY connection and ask; returns the answer and the open channel.

    The caller may go on on the channel (GO, ABORT or DONE after the
    answer) and must close it.  Raises RelocdError or OSError when the
    target cannot be reached or answers out of turn.
    """
    channel = await reconnect()
    try:
        await hello(channel, Role.QUERY, migration_id)
        await channel.send(Query(uuidlib.UUID(migration_id).bytes))
        outcome = await channel.recv()
        if not isinstance(outcome, Outcome):
            raise ProtocolError(f"{type(outcome).__name__} where OUTCOME was due")
        return outcome.state, channel
    except BaseException:
        await channel.close()
        raise


async def drop_prepared_copy(reconnect: Reconnect, migration_id: str, message: str) -> None:
    """We gave up before GO: see that the target drops any prepared copy it holds.

    Asks (QUERY) until the target holds none (ABORTED, UNKNOWN) or holds a
    prepared one and takes our ABORT; a target still RECEIVING is asked
    again, as it may yet reach PREPARED.  Never gives up: returns once the
    target has confirmed (the caller then closes the journal entry).
    """
    lg = log.bind(migration_id=migration_id)
    backoff = Backoff(first=0.5)  # let an ABORT sent on the old connection land first
    while True:
        await backoff.wait()
        try:
            state, channel = await ask(reconnect, migration_id)
            try:
                if state == OutcomeState.PREPARED:
                    await channel.send(Abort(Reason.CANCELLED, message[:200]))
                    with contextlib.suppress(RelocdError, OSError, TimeoutError):
                        async with asyncio.timeout(2):
                            await channel.recv()  # the target closes once it has dropped it
                    # Confirmed only by asking again: a lost ABORT must not count.
                    continue
                if state in (OutcomeState.ABORTED, OutcomeState.UNKNOWN):
                    lg.info("target holds no prepared copy")
                    return
            finally:
                await channel.close()
        except (RelocdError, OSError) as exc:
            lg.info("cannot reach the target yet to drop its prepared copy", error=str(exc))


async def settle_abort(journal: Journal, reconnect: Reconnect, migration_id: str, message: str) -> None:
    """A migration rolled back before GO: the entry closes once the target holds no copy."""
    await drop_prepared_copy(reconnect, migration_id, message)
    journal.finish(migration_id, "rolled-back", message)
