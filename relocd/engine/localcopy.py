"""The source's own copy of a domain being sent: one owner for its fate.

Every change to the local copy during a migration goes through here, in the
order the exactly-once rule needs (docs/design.md, "the durable facts of the
handoff"): paused for stop-and-copy (or suspended by a hypervisor's own
save), renamed ``NAME--migratedaway`` before GO, destroyed only once the
target said it runs the domain, or rolled back, with ABORTED journaled
*before* the copy runs again, so a restart that finds the copy gone knows
it never ran after its pause.
"""

from __future__ import annotations

import structlog

from relocd.drivers.base import MIGRATED_AWAY_SUFFIX, Domain
from relocd.engine.hooks import DomainHooks
from relocd.engine.journal import Journal, Phase
from relocd.errors import RelocdError


class LocalCopy:
    def __init__(
        self,
        domain: Domain,
        name: str,
        journal: Journal | None,
        migration_id: str,
        hooks: DomainHooks,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self.domain = domain
        #: the domain's own name (the copy may carry NAME--migratedaway)
        self.name = name
        self.journal = journal
        self.mid = migration_id
        self.hooks = hooks
        self.log = log
        #: our send stopped it (paused, or suspended by its driver's save)
        self.stopped = False
        self.renamed = False
        self.logging_dirty = False
        #: auto-converge slowed it down (undone before it runs on here)
        self.throttled = False

    @classmethod
    def in_doubt(cls, domain: Domain, name: str, journal: Journal, migration_id: str,
                 hooks: DomainHooks, log: structlog.typing.FilteringBoundLogger) -> LocalCopy:  # fmt: skip
        """A copy found at GO_SENT after a restart: stopped by our send, perhaps renamed."""
        copy = cls(domain, name, journal, migration_id, hooks, log)
        copy.stopped = True
        copy.renamed = domain.name != name
        return copy

    async def start_dirty_log(self) -> None:
        await self.domain.dirty_log_start()
        self.logging_dirty = True

    async def stop_dirty_log(self) -> None:
        if self.logging_dirty:
            await self.domain.dirty_log_stop()
            self.logging_dirty = False

    async def pause(self) -> None:
        """Stop-and-copy: no guest write lands after this."""
        await self.domain.pause()
        self.stopped = True
        await self.hooks.paused(self.domain)

    async def throttle(self, fraction: float) -> None:
        """Auto-converge: let the guest run only ``1 - fraction`` of the time."""
        await self.domain.throttle(fraction)
        self.throttled = fraction > 0

    async def unthrottle(self) -> None:
        if self.throttled:
            await self.domain.throttle(0.0)
            self.throttled = False

    async def suspended_by_send(self) -> None:
        """A hypervisor's own save stopped it (a Xen guest): undone by ``undo_send``."""
        self.stopped = True
        await self.hooks.paused(self.domain)

    async def rename_away(self) -> None:
        """Before GO: never two domains of one name, whatever happens next."""
        await self.domain.rename(self.name + MIGRATED_AWAY_SUFFIX)
        self.renamed = True

    async def hand_over(self) -> None:
        """The target runs it now: ours goes (its memory freed in the background, where the driver can)."""
        await self.domain.discard()
        await self.hooks.destroyed(self.domain)

    async def roll_back(self) -> None:
        """Ours is the copy that runs: ABORTED journaled first, then the copy restored."""
        journal = self.journal
        entry = journal.get(self.mid) if journal is not None else None
        if journal is not None and entry is not None and not entry.finished and entry.phase != Phase.ABORTED:
            journal.set_phase(self.mid, Phase.ABORTED)
        await self.restore()

    async def restore(self) -> None:
        """Undo what the send did to the copy, in reverse order (no journal write)."""
        try:
            await self.stop_dirty_log()
        except RelocdError as exc:
            self.log.warning("could not stop the dirty log", error=exc.message)
            self.logging_dirty = False
        if self.throttled:
            try:
                await self.unthrottle()
            except RelocdError as exc:
                self.log.warning("could not lift the auto-converge throttle", error=exc.message)
        if self.renamed:
            await self.domain.rename(self.name)
            self.renamed = False
        if self.stopped:
            await self.domain.undo_send()  # the driver's own undo (a resume, or more)
            self.stopped = False
            await self.hooks.resumed_here(self.domain)
