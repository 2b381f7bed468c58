"""The source's ending of a migration, from the handoff on: GO, and what follows it.

Split from ``source.py`` (``SourceMigration`` inherits it): the part that
runs once the target holds a complete, paused copy.  Our copy is renamed
away and GO made durable before it is sent; after that the local copy stays
paused until the target says what happened: RESUMED on the migration's
connection, or the answer to a QUERY when the link dropped (asked again and
again, with backoff, however long it takes; the operator is told "in doubt"
after ``recovery_s``).  With a cluster store the ownership record decides
instead of the peer (docs/cluster.md).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import TYPE_CHECKING, cast

import structlog

from relocd.cluster.handoff import settle_by_store, source_offer
from relocd.drivers.base import MIGRATED_AWAY_SUFFIX
from relocd.engine.faults import fault_point
from relocd.engine.journal import Journal, Phase
from relocd.engine.localcopy import LocalCopy
from relocd.engine.query import Backoff, Reconnect, ask
from relocd.engine.result import MigrationResult
from relocd.engine.stream import RecordChannel
from relocd.errors import ProtocolError, RelocdError
from relocd.protocol.records import Done, Go, OutcomeState, Record, Resumed

if TYPE_CHECKING:
    from relocd.engine.source import SendOptions, SourceMigration


class HandoffEnding:
    """GO and after, for ``SourceMigration`` (which holds every attribute named here)."""

    name: str
    mid: str
    target: str
    channel: RecordChannel
    journal: Journal
    opts: SendOptions
    copy: LocalCopy
    result: MigrationResult
    reconnect: Reconnect | None
    paused_at: float | None
    past_go: bool
    in_doubt_notice: asyncio.Future[MigrationResult] | None
    log: structlog.typing.FilteringBoundLogger

    if TYPE_CHECKING:

        async def send(self, record: Record) -> None: ...

        async def _abort_before_go(self, exc: BaseException, journaled: bool) -> None: ...

    async def _handoff(self) -> MigrationResult:
        # Past this point the target holds a complete, paused copy.  Rename
        # ours first so the two are never confused, then make GO durable.
        self.past_go = True  # before the first await: no abort from here
        try:
            await source_offer(cast("SourceMigration", self))
            await self.copy.rename_away()
            self.journal.set_phase(self.mid, Phase.GO_SENT)
            self.result.mark("go")
        except (RelocdError, OSError) as exc:  # GO not sent: ours is still the copy that runs
            msg = exc.message if isinstance(exc, RelocdError) else f"I/O error: {exc}"
            await self._abort_before_go(exc, True)
            return self.result.finish("rolled-back", f"before GO: {msg}")
        try:
            await self.send(Go())
            await fault_point("source", "go")
            answer = await self.channel.recv()
        except (RelocdError, OSError) as exc:
            self.log.warning("link lost after GO; asking the target", error=str(exc))
            return await self._recover_after_go()
        assert isinstance(answer, Resumed)
        await fault_point("source", "resumed")
        return await self._conclude(answer, self.channel)

    async def _conclude(self, answer: Resumed, channel: RecordChannel) -> MigrationResult:
        self.result.mark("resumed")
        self.result.target_details = dict(answer.details)
        if self.paused_at is not None:
            self.result.downtime_ms = (time.monotonic() - self.paused_at) * 1000
            self.result.downtime_breakdown_ms = self.result.breakdown()
        if not answer.ok:
            # The target could not resume and has destroyed its copy: ours is the one.
            await self.copy.roll_back()
            self.journal.finish(self.mid, "rolled-back", "target failed to resume")
            await channel.close()
            return self.result.finish("rolled-back", f"target failed to resume: {answer.details.get('error', '?')}")
        await self.copy.hand_over()
        try:
            await channel.send(Done())
        except (RelocdError, OSError):
            pass  # the target is running; DONE is a courtesy
        self.journal.set_phase(self.mid, Phase.DONE)
        self.journal.finish(self.mid, "completed")
        await channel.close()
        self.log.info(
            "migration completed",
            downtime_ms=round(self.result.downtime_ms, 1),
            iterations=self.result.iterations,
        )
        return self.result.finish("completed")

    async def _recover_after_go(self) -> MigrationResult:
        """The link dropped after GO: keep our copy paused until the target tells.

        Asks until it answers, however long that takes; after ``recovery_s``
        the interim in-doubt result goes to ``in_doubt_notice`` for whoever
        waits on the operator's side.
        """
        if self.channel is not None:
            await self.channel.close()
        if self.opts.cluster is not None:
            return await settle_by_store(cast("SourceMigration", self))  # the record, not the peer, decides (docs/cluster.md)
        told_at = time.monotonic() + self.opts.recovery_s
        backoff = Backoff()
        last_error = "no answer"
        while self.reconnect is not None:
            try:
                state, channel = await ask(self.reconnect, self.mid)
                try:
                    if state in (OutcomeState.RESUMED, OutcomeState.DONE):
                        return await self._conclude_resumed_elsewhere(channel)
                    if state == OutcomeState.PREPARED:
                        await channel.send(Go())
                        answer = await channel.recv()
                        if not isinstance(answer, Resumed):
                            raise ProtocolError(f"{type(answer).__name__} where RESUMED was due")
                        return await self._conclude(answer, channel)
                    if state in (OutcomeState.ABORTED, OutcomeState.UNKNOWN):
                        # The target holds no copy (it never got GO, or dropped
                        # a prepared domain): ours is the only one.
                        await self.copy.roll_back()
                        self.journal.finish(self.mid, "rolled-back", "target reports no copy")
                        return self.result.finish("rolled-back", "link lost; target holds no copy, resumed here")
                    last_error = f"target reports {state.name}"
                finally:
                    await channel.close()
            except (RelocdError, OSError) as exc:
                last_error = exc.message if isinstance(exc, RelocdError) else str(exc)
            if time.monotonic() >= told_at:
                self._tell_in_doubt(last_error)
            await backoff.wait()
        return self._tell_in_doubt(last_error)

    def _tell_in_doubt(self, last_error: str) -> MigrationResult:
        """The interim answer for the operator: in doubt, kept paused, still asking."""
        msg = (
            f"in doubt: link to {self.target} lost after GO ({last_error}); "
            f"{self.name}{MIGRATED_AWAY_SUFFIX} kept paused here; relocd keeps asking the target"
        )
        interim = dataclasses.replace(self.result).finish("failed", msg)
        notice = self.in_doubt_notice
        if notice is not None and not notice.done():
            self.log.error("migration in doubt", error=last_error)
            notice.set_result(interim)
        return interim

    async def _conclude_resumed_elsewhere(self, channel: RecordChannel) -> MigrationResult:
        if self.paused_at is not None:
            self.result.downtime_ms = (time.monotonic() - self.paused_at) * 1000
        await self.copy.hand_over()
        try:
            await channel.send(Done())
        except (RelocdError, OSError):
            pass
        self.journal.set_phase(self.mid, Phase.DONE)
        self.journal.finish(self.mid, "completed")
        return self.result.finish("completed")
