"""The handoff's steps that ask the cluster store, called from the engine with a line each.

Kept out of ``engine/source.py`` and ``engine/target.py`` so those read the
same with or without a store; each function does nothing when the host (or
the migration) has none.  docs/cluster.md says why each step is where it is.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from relocd.cluster.ownership import Settled
from relocd.cluster.store import StoreUnavailable
from relocd.drivers.base import INCOMING_SUFFIX, MIGRATED_AWAY_SUFFIX, Domain, DomainState
from relocd.engine.journal import Phase
from relocd.engine.query import Backoff
from relocd.errors import Reason, RelocdError, ReservationRefused
from relocd.protocol.records import Resumed

if TYPE_CHECKING:
    from relocd.engine.host import Host
    from relocd.engine.reservation import ReservationRequest
    from relocd.engine.result import MigrationResult
    from relocd.engine.source import SourceMigration

log = structlog.get_logger("relocd.cluster")

#: the RESERVE / RESERVED field saying both sides arbitrate by the store
FLAG = "cluster_store"
#: resumes tried again when the failed one left ours the only copy
RESUME_RETRIES = 3


def no_handoff(exc: StoreUnavailable) -> RelocdError:
    """The one line an operator reads when the store is down before GO."""
    return RelocdError(f"{exc.message}; no handoff without it: the domain stays here", reason=Reason.CANCELLED)


# -- source ---------------------------------------------------------------------------


async def source_reserve(m: SourceMigration, request: dict[str, Any]) -> None:
    """Before RESERVE: the store answers and says the domain is ours (or unrecorded)."""
    own = m.opts.cluster
    if own is None:
        return
    try:
        await own.check_mine(m.domain.config.uuid, m.name)
    except StoreUnavailable as exc:
        raise no_handoff(exc) from None
    request[FLAG] = True


def source_reserved(m: SourceMigration, info: dict[str, Any]) -> None:
    """A target that does not arbitrate by the same store would resume without a claim."""
    if m.opts.cluster is not None and info.get(FLAG) is not True:
        raise RelocdError("the target has no cluster store: with one here, a handoff needs one there", reason=Reason.CANCELLED)


async def source_offer(m: SourceMigration) -> None:
    """Before GO_SENT: the record names this migration, the only one whose target may claim."""
    own = m.opts.cluster
    if own is None:
        return
    try:
        await own.offer(m.domain.config.uuid, m.name, m.mid)
    except StoreUnavailable as exc:
        raise no_handoff(exc) from None


async def withdraw_offer(host: Host, uuid: str, mid: str) -> bool:
    """A migration over with our copy running here: fence its offer if it is still in the record.

    Before GO the source rolls back without asking the store (no target
    claims without GO), so its offer stays: harmless, but a prepared target
    would wait for it.  Fenced, that target drops its copy at its next sweep.
    Best effort: the next offer supersedes (and fences) a stale one anyway.
    True once the record holds no offer for ``mid``.
    """
    own = host.cluster
    dom = host.find_uuid(uuid)
    if own is None or dom is None:
        return own is None
    if dom.name.endswith((INCOMING_SUFFIX, MIGRATED_AWAY_SUFFIX)) or dom.state not in (
        DomainState.RUNNING, DomainState.PAUSED
    ):  # fmt: skip
        return False  # not (yet) ours alone: the handoff's own steps decide
    try:
        await own.withdraw(uuid, mid)
    except (StoreUnavailable, RelocdError) as exc:
        log.warning("stale offer left in the cluster store (the next migration supersedes it)",
                    migration_id=mid, error=exc.message)  # fmt: skip
        return False
    return True


async def settle_by_store(m: SourceMigration) -> MigrationResult:
    """The link dropped after GO: the record, not the peer, says which copy runs."""
    own = m.opts.cluster
    assert own is not None
    told_at = time.monotonic() + m.opts.recovery_s
    backoff = Backoff()
    uuid = m.domain.config.uuid
    while True:
        try:
            verdict = await own.settle(uuid, m.mid)
        except StoreUnavailable as exc:
            last = exc.message
        else:
            if verdict == Settled.TAKEN:
                if m.paused_at is not None:
                    m.result.downtime_ms = (time.monotonic() - m.paused_at) * 1000
                await m.copy.hand_over()
                m.journal.set_phase(m.mid, Phase.DONE)
                m.journal.finish(m.mid, "completed", "settled by the cluster store: the target took the domain")
                m.log.info("settled by the cluster store: the target took the domain")
                return m.result.finish("completed")
            if verdict == Settled.FENCED:
                await m.copy.roll_back()
                why = "link lost after GO; the target never took the domain (fenced in the cluster store), resumed here"
                m.journal.finish(m.mid, "rolled-back", why)
                m.log.warning("settled by the cluster store: fenced, resumed here")
                return m.result.finish("rolled-back", why)
            last = "the cluster store's record names neither side for this migration"
        if time.monotonic() >= told_at:
            m._tell_in_doubt(last)
        await backoff.wait()


# -- target ---------------------------------------------------------------------------


def target_reserve_check(host: Host, req: ReservationRequest) -> None:
    """Both sides arbitrate by a store, or neither does."""
    if (host.cluster is not None) != bool(req.cluster_store):
        here = "has a cluster store" if host.cluster is not None else "has no cluster store"
        raise ReservationRefused(f"this host {here} and the source does not agree", reason=Reason.LIMIT)


def reserved_info(host: Host) -> dict[str, Any]:
    return {FLAG: True} if host.cluster is not None else {}


async def target_claim(
    host: Host, mid: str, domain: Domain, lg: Any, release: Callable[[str], None]
) -> Resumed | None:
    """GO taken, RESUMING journaled: claim before the resume.  None: ours, go on; else the answer."""
    own = host.cluster
    if own is None:
        return None
    # Also at STARTING (a restart finishing the resume): the claim is
    # idempotent, and a give-back whose copy was not destroyed yet shows here.
    backoff = Backoff()
    while True:
        try:
            if await own.claim(domain.config.uuid, mid):
                return None
            break
        except StoreUnavailable as exc:
            lg.warning("cannot claim the domain yet; keeping the copy paused", error=exc.message)
        await backoff.wait()
    why = "the source fenced this migration in the cluster store"
    lg.warning("claim lost: dropping the incoming copy", error=why)
    await _drop(host, mid, domain, why, release)
    return Resumed(False, {"error": why})


async def target_give_back(host: Host, mid: str, domain: Domain, lg: Any) -> bool:
    """Our resume failed after the claim: True once the source has its domain back (destroy ours)."""
    own = host.cluster
    if own is None:
        return True
    backoff = Backoff()
    while True:
        try:
            if await own.give_back(domain.config.uuid, mid):
                return True
            lg.error("resume failed and the source has let its copy go: ours is the only one, kept")
            return False
        except StoreUnavailable as exc:
            lg.warning("cannot give the domain back yet", error=exc.message)
        await backoff.wait()


async def _drop(host: Host, mid: str, domain: Domain, why: str, release: Callable[[str], None]) -> None:
    journal = host.journal
    journal.set_phase(mid, Phase.ABORTED)  # the intent, before the copy goes
    await domain.destroy()
    await host.hooks.destroyed(domain)
    release(mid)
    journal.finish(mid, "rolled-back", why)


async def sweep_fenced(host: Host, release: Callable[[str], None]) -> int:
    """Prepared copies whose source settled without us (fenced): dropped.  How many."""
    own = host.cluster
    if own is None:
        return 0
    dropped = 0
    for mid, domain in list(host.in_doubt.items()):
        try:
            fenced = await own.fenced(domain.config.uuid, mid)
        except StoreUnavailable:
            return dropped
        entry = host.journal.get(mid)
        # re-checked after the await: a GO may have started on it meanwhile
        if not fenced or mid in host.resuming or entry is None or entry.finished or entry.phase != Phase.PREPARED:
            continue
        if not domain.name.endswith(INCOMING_SUFFIX):
            continue
        log.warning("the source fenced this migration in the cluster store: dropping the prepared copy",
                    migration_id=mid, domain=entry.domain)  # fmt: skip
        await _drop(host, mid, domain, "fenced in the cluster store: the source settled without us", release)
        dropped += 1
    return dropped


async def resume_kept(host: Host, mid: str, domain: Domain, lg: Any, release: Callable[[str], None]) -> Resumed:
    """The resume failed after the source let its copy go: ours is the domain; try again, then the operator."""
    for attempt in range(RESUME_RETRIES):
        await asyncio.sleep(1.0)
        try:
            await domain.resume()
        except RelocdError as exc:
            lg.error("resume failed again", attempt=attempt + 2, error=exc.message)
            continue
        host.journal.set_phase(mid, Phase.RESUMED)
        release(mid)
        details = await host.hooks.after_resume(domain)
        return Resumed(True, {**details, "resume_retries": attempt + 1})
    lg.error("the only copy will not resume: kept paused for the operator (relocd settle)")
    return Resumed(False, {"error": "resume failed; the only copy is kept paused here", "kept": True})
