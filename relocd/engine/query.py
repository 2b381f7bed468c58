"""The QUERY client: one piece of code asks a target what became of a migration.

Used by a source whose link dropped after GO, by a source that gave up
before GO and must see a prepared copy dropped, and by a restarted daemon
finishing either.  None of them gives up: a peer that does not answer is
asked again, with backoff, until it does (a restart carries on from the
journal).  What each caller does with the answer is its own.
"""

from __future__ import annotations

import asyncio
import uuid as uuidlib
from collections.abc import Awaitable, Callable

from relocd.engine.handshake import hello
from relocd.engine.stream import RecordChannel
from relocd.errors import ProtocolError
from relocd.protocol.records import Outcome, OutcomeState, Query, Role

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
