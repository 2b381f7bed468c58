"""The host: what every operation and session on this machine acts on, built whole at startup.

The daemon builds one ``Host`` before it serves anything (drivers started,
journal open, reservation table, network hooks) and hands it to the
operations, the incoming sessions and recovery; none of them sees the daemon
or a field that is still missing.  It holds the per-domain claims (one
operation at a time on a domain), the in-flight bookkeeping of incoming
migrations, and the tasks the shutdown waits for or cancels.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Protocol, TypeVar

import structlog

from relocd.cluster.ownership import Ownership
from relocd.drivers.base import INCOMING_SUFFIX, MIGRATED_AWAY_SUFFIX, Domain, Driver
from relocd.engine.claims import Claim, ClaimTable
from relocd.engine.hooks import DomainHooks
from relocd.engine.journal import SOURCE, TARGET, Journal, JournalEntry, Phase
from relocd.engine.reservation import ReservationTable
from relocd.errors import DomainBusy, DomainNotFound
from relocd.protocol.records import Resumed

_T = TypeVar("_T")

log = structlog.get_logger("relocd.host")


class Expirable(Protocol):
    """An incoming session holding a reservation (engine/target.py TargetSession)."""

    def expire(self) -> None: ...


@dataclasses.dataclass
class Host:
    drivers: Mapping[str, Driver]
    reservations: ReservationTable
    journal: Journal
    #: relocd-max-memory: what incoming domains may reserve in all (None: no cap)
    max_memory: int | None = None
    hooks: DomainHooks = dataclasses.field(default_factory=DomainHooks)
    #: prepared domains whose source has not said GO or ABORT yet, by migration id
    in_doubt: dict[str, Domain] = dataclasses.field(default_factory=dict)
    #: domains being received, by migration id (for `relocd list`)
    incoming: dict[str, Domain] = dataclasses.field(default_factory=dict)
    #: migrations whose GO is being acted on, by id: a second GO (a QUERY's
    #: retry racing the first) waits for the first one's answer instead of
    #: resuming again
    resuming: dict[str, asyncio.Future[Resumed]] = dataclasses.field(default_factory=dict)
    #: one claim per domain for every operation on it (see engine/claims.py)
    claims: ClaimTable = dataclasses.field(default_factory=ClaimTable)
    #: incoming sessions holding a reservation, by migration id (for expiry)
    sessions: dict[str, Expirable] = dataclasses.field(default_factory=dict)
    #: operations the shutdown lets finish for its grace period (migrations, saves)
    tasks: set[asyncio.Task[Any]] = dataclasses.field(default_factory=set)
    #: helpers the shutdown cancels (recovery's resolvers, sweeps)
    background: set[asyncio.Task[Any]] = dataclasses.field(default_factory=set)
    #: told of what happened here (metrics, STATUS=): ``observer(event, fields)``
    observers: list[Callable[[str, dict[str, Any]], None]] = dataclasses.field(default_factory=list)
    #: relocd-cluster-store: ownership records that arbitrate handoffs (None: journal only)
    cluster: Ownership | None = None

    def notify(self, event: str, **fields: Any) -> None:
        """Tell the observers; one that raises is logged, never the caller's problem.

        Events: ``migration_started`` (direction), ``migration_finished``
        (direction, status, result: the result's JSON), ``save_finished`` /
        ``restore_finished`` (status, seconds).
        """
        for observer in list(self.observers):
            try:
                observer(event, fields)
            except Exception:
                log.exception("observer failed", observed=event)

    def in_doubt_counts(self) -> dict[str, int]:
        """Work not yet settled with a peer: prepared copies here, and our
        migrations still asking their target (after GO, or to drop a copy).

        For `relocd status` and the metrics endpoint, which calls it from its
        own thread: the journal takes its lock, and ``len`` of a dict is atomic.
        """
        incoming = len(self.in_doubt) + sum(
            1 for e in self.journal.unfinished(TARGET) if e.phase == Phase.STARTING and self.migration_copy(e) is None
        )
        outgoing = sum(1 for e in self.journal.unfinished(SOURCE) if e.phase in (Phase.GO_SENT, Phase.ABORTED))
        return {"in_doubt": incoming + outgoing, "in_doubt_incoming": incoming, "in_doubt_outgoing": outgoing}

    # -- domains ------------------------------------------------------------------

    def all_domains(self) -> list[Domain]:
        return [d for drv in self.drivers.values() for d in drv.domains()]

    def find(self, name: str) -> Domain:
        for d in self.all_domains():
            if d.name == name:
                return d
        raise DomainNotFound(f"no domain named {name!r}")

    def find_uuid(self, uuid: str) -> Domain | None:
        for d in self.all_domains():
            if d.config.uuid == uuid:
                return d
        return None

    def migration_copy(self, entry: JournalEntry) -> Domain | None:
        """This host's copy of a migration's domain, by uuid *and* the names its phase allows.

        Where two daemons share one hypervisor (two relocd in one Xen dom0)
        both copies carry the uuid, and only the name tells them apart: a
        target's copy is ``NAME--incoming`` until GO and ``NAME`` once it
        resumes (RESUMING on); a source's is ``NAME`` until it renames it
        ``NAME--migratedaway`` just before GO_SENT.  A renamed copy at
        PREPARED (a journal from before RESUMING existed) or at ABORTED (a
        resume that failed, its copy not yet destroyed) counts only where the
        hypervisor is not shared, where nothing else can carry the uuid.
        """
        name = entry.domain
        if entry.role == SOURCE:
            allowed = {name + MIGRATED_AWAY_SUFFIX}
            if entry.phase not in (Phase.GO_SENT, Phase.DONE):
                allowed.add(name)
        elif entry.phase in (Phase.RESUMING, Phase.STARTING, Phase.RESUMED):
            allowed = {name + INCOMING_SUFFIX, name}
        else:
            allowed = {name + INCOMING_SUFFIX}
        found = [d for d in self.all_domains() if d.config.uuid == entry.uuid]
        for dom in sorted(found, key=lambda d: not d.name.endswith(INCOMING_SUFFIX)):
            if dom.name in allowed:
                return dom
            if entry.role != SOURCE and entry.phase in (Phase.PREPARED, Phase.ABORTED) and dom.name == name:
                driver = self.drivers.get(dom.config.driver)
                if driver is not None and not driver.shared_hypervisor:
                    return dom
        return None

    def claim(self, name: str, op: str, *, moving: bool = False) -> tuple[Domain, Claim]:
        """The named domain, claimed for ``op``: never awaits, so two operations
        cannot both pass; DomainBusy names the holder."""
        dom = self.find(name)
        if dom.name.endswith(INCOMING_SUFFIX):
            raise DomainBusy(f"{dom.name} is an incoming migration; relocd decides what becomes of it")
        if dom.name.endswith(MIGRATED_AWAY_SUFFIX):
            raise DomainBusy(f"{dom.name} is part of a migration; relocd decides when it runs")
        return dom, self.claims.take(dom.config.uuid, dom.name, op, moving=moving)

    # -- tasks ---------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, _T], name: str | None = None) -> asyncio.Task[_T]:
        """A helper the shutdown cancels (it picks up again from the journal)."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task

    def start_operation(self, coro: Coroutine[Any, Any, _T], name: str | None = None) -> asyncio.Task[_T]:
        """An operation the shutdown lets finish (then cancels: it rolls back)."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def run_to_end(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run an operation to its end even if whoever asked for it goes away."""
        return await asyncio.shield(self.start_operation(coro))
