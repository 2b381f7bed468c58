"""The target's last steps: resume after GO, and what it answers about a migration.

Split from ``target.py``: shared by the migration's own session (GO on its
connection), the QUERY answers, a restarted daemon's recovery and ``relocd
settle``.  The journal moved to RESUMING before any of this runs; each step
is skipped when the hypervisor shows it done, so finishing a resume cut
short by a crash is the same code.  QUERY answers come from the journal
and the hypervisor, never from what memory lacks.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

from relocd.cluster import handoff as cluster
from relocd.drivers.base import INCOMING_SUFFIX, Domain, DomainState
from relocd.engine.host import Host
from relocd.engine.journal import Phase
from relocd.errors import RelocdError
from relocd.protocol.records import OutcomeState, Resumed

TargetContext = Host


def release_incoming(ctx: TargetContext, mid: str) -> None:
    """The migration has settled here: forget its copy and free its room."""
    ctx.in_doubt.pop(mid, None)
    ctx.incoming.pop(mid, None)
    ctx.reservations.release(mid)


async def finish_resume(
    ctx: TargetContext,
    mid: str,
    domain: Domain,
    lg: structlog.typing.FilteringBoundLogger,
    *,
    release: Callable[[str], None],
) -> Resumed:
    """RESUMING is on disk: make ``domain`` the running copy, then journal RESUMED.

    If the resume fails, ABORTED is journaled *before* the copy is destroyed,
    so a crash in between leaves an ABORTED entry whose copy recovery
    destroys, not a STARTING one without a copy (which needs an operator).

    Also what a restarted target does with a migration it finds at RESUMING
    (the rename and the resume may or may not have happened): each step is
    skipped when the hypervisor shows it done.
    """
    lost = await cluster.target_claim(ctx, mid, domain, lg, release)  # with a store: its word first
    if lost is not None:
        return lost
    final_name = domain.name.removesuffix(INCOMING_SUFFIX)
    t0 = time.monotonic()
    try:
        if domain.name != final_name:
            await domain.rename(final_name)
        if domain.state != DomainState.RUNNING:
            await ctx.hooks.before_resume(domain)
            # The last fact before the copy may run: a restart that finds it
            # gone after this must not let the source resume an older state.
            if ctx.journal.get(mid).phase != Phase.STARTING:  # type: ignore[union-attr]
                ctx.journal.set_phase(mid, Phase.STARTING)
            await domain.resume()
    except RelocdError as exc:
        # Could not resume: destroy ours so the source may resume its own.
        lg.error("resume failed after GO", error=exc.message)
        if not await cluster.target_give_back(ctx, mid, domain, lg):
            return await cluster.resume_kept(ctx, mid, domain, lg, release)
        ctx.journal.set_phase(mid, Phase.ABORTED)  # it never ran: the source's copy is the one
        await domain.destroy()
        await ctx.hooks.destroyed(domain)
        release(mid)
        ctx.journal.finish(mid, "failed", exc.message)
        return Resumed(False, {"error": exc.message})
    ctx.journal.set_phase(mid, Phase.RESUMED)
    resume_ms = round((time.monotonic() - t0) * 1000, 3)
    release(mid)
    lg.info("domain resumed", domain=final_name, resume_ms=resume_ms)
    try:
        details = await ctx.hooks.after_resume(domain)
    except Exception as exc:  # an announce failure never undoes a resume
        lg.exception("after-resume hook failed")
        details = {"announce_error": str(exc)}
    announce_ms = round((time.monotonic() - t0) * 1000 - resume_ms, 3)
    return Resumed(True, {**details, "resume_ms": resume_ms, "announce_ms": announce_ms})


def outcome_of(ctx: TargetContext, mid: str) -> OutcomeState:
    """What this host knows about a migration, for a QUERY: journal plus hypervisor.

    Never inferred from what memory lacks: a PREPARED entry whose copy is
    not in ``in_doubt`` is looked up by uuid, and only a copy that is truly
    gone answers ABORTED.  RESUMING (GO being acted on, or a restarted
    daemon finishing it) answers RECEIVING: not settled, ask again.
    """
    entry = ctx.journal.get(mid)
    if entry is None:
        return OutcomeState.UNKNOWN
    phase = entry.phase
    if entry.role == "target":
        if phase == Phase.PREPARED and not entry.finished:
            if mid in ctx.in_doubt:
                return OutcomeState.PREPARED
            dom = ctx.migration_copy(entry)
            if dom is None:
                return OutcomeState.ABORTED  # prepared, then lost with its host
            if dom.name.endswith(INCOMING_SUFFIX):
                ctx.in_doubt[mid] = dom
                return OutcomeState.PREPARED
            return OutcomeState.RECEIVING  # renamed: a resume under way; recovery settles it
        if phase in (Phase.RESUMING, Phase.STARTING):
            return OutcomeState.RECEIVING  # being resumed, or (STARTING, copy lost) for the operator
        if phase == Phase.RESUMED:
            return OutcomeState.RESUMED
        if phase == Phase.ABORTED:
            return OutcomeState.ABORTED
        return OutcomeState.RECEIVING
    if phase == Phase.DONE:
        return OutcomeState.DONE
    if phase == Phase.GO_SENT:
        return OutcomeState.GO_SENT
    if phase == Phase.ABORTED:
        return OutcomeState.ABORTED
    return OutcomeState.RECEIVING
