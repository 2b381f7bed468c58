"""Finishing what a previous daemon left: the journal says where each migration stood.

Source side:
* before GO: the target never got the word, so our copy is the one — rename
  it back, resume it, and tell the target to drop its prepared copy if it has one.
* GO sent: we cannot know whether the target resumed; keep our copy paused
  and ask the target until it answers (in the background, forever).

Target side:
* receiving: the stream was cut, destroy the half-built domain.
* prepared: keep the paused domain; the source will ask (QUERY) and decide.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable

import structlog

from relocd.cluster.handoff import withdraw_offer
from relocd.drivers.base import (
    INCOMING_SUFFIX,
    MIGRATED_AWAY_SUFFIX,
    Domain,
)
from relocd.engine.journal import JournalEntry, Phase
from relocd.engine.policy import XendPolicy
from relocd.engine.journal import TLS
from relocd.config.settings import Settings
from relocd.engine.host import Host
from relocd.engine.query import Backoff, Reconnect, ask, drop_prepared_copy, settle_abort
from relocd.engine.source import SendOptions, SourceMigration, settling_task_name
from relocd.engine.stream import ByteTransport, RecordChannel
from relocd.engine.target_resume import finish_resume, release_incoming
from relocd.errors import RelocdError
from relocd.protocol.records import Done, Go, OutcomeState, Resumed, Role
from relocd.protocol.state import Conversation
from relocd.server.tls import client_context, connect_tls
from relocd.server.transport import connect


log = structlog.get_logger("relocd.recovery")


def split_host_port(text: str) -> tuple[str, int]:
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
    else:
        host, _, port = text.rpartition(":")
    return host, int(port)


async def recover_unfinished(host: Host, settings: Settings) -> None:
    for entry in host.journal.unfinished():
        lg = log.bind(migration_id=entry.migration_id, domain=entry.domain, phase=str(entry.phase))
        dom = host.migration_copy(entry)
        try:
            if entry.role == "source":
                await _recover_source(host, settings, entry, dom, lg)
            else:
                await _recover_target(host, entry, dom, lg)
        except RelocdError as exc:
            lg.error("recovery step failed", error=exc.message)
        except Exception:  # a bug in one entry's recovery must not keep the daemon down
            lg.exception("recovery step failed")


async def _recover_source(
    host: Host, settings: Settings, entry: JournalEntry, dom: Domain | None, lg: structlog.BoundLogger
) -> None:
    journal = host.journal

    def reconnect() -> Awaitable[RecordChannel]:
        return dial_target(settings, entry)

    mid = entry.migration_id
    if entry.phase == Phase.DONE:
        # Crashed between DONE and finish(): the target runs it, ours is gone.
        journal.finish(mid, "completed")
        return
    if entry.phase == Phase.GO_SENT:
        if dom is None:
            # Our copy is gone (the host lost power, say): the target's may be
            # the only one, and may still wait for GO.  Ask before anything.
            lg.warning("GO was sent and the local copy is gone; asking the target")
            host.spawn(_resolve_without_copy(host, reconnect, entry), name=settling_task_name(mid))
            return
        lg.warning("migration in doubt after restart: keeping the domain paused and asking the target")
        claim = host.claims.take(entry.uuid, entry.domain, f"in-doubt migration to {entry.peer}", moving=True)
        task = host.spawn(_resolve_in_doubt(host, reconnect, entry, dom), name=settling_task_name(mid))
        task.add_done_callback(lambda _t: claim.release())
        return
    if dom is None and entry.phase in (Phase.STOPPED, Phase.PREPARED):
        # Our copy is gone (the host lost power) and never ran after its pause
        # (a rollback journals ABORTED first): a prepared copy on the target
        # holds the latest state and is the only one.  Ask, and send it GO.
        lg.warning("the local copy is gone before GO; asking the target whether it holds the only one")
        host.spawn(_resolve_without_copy(host, reconnect, entry), name=settling_task_name(mid))
        return
    if dom is None and entry.phase != Phase.ABORTED:
        lg.error("the local copy is gone and the target never had all of it: the domain is lost")
    if entry.phase != Phase.ABORTED:
        journal.set_phase(mid, Phase.ABORTED)  # the intent, before the rollback
    try:
        if dom is not None:
            # Before GO (or after the target said it holds none): ours is the
            # only copy that may run.  Idempotent: a rollback cut short is finished.
            if dom.name != entry.domain and dom.name.endswith(MIGRATED_AWAY_SUFFIX):
                await dom.rename(entry.domain)
            await dom.undo_send()
            lg.info("interrupted migration rolled back: domain runs here")
            await withdraw_offer(host, entry.uuid, mid)  # an offer made before the crash: fenced
    except RelocdError:
        # The entry stays open, so the next restart tries the rollback again;
        # the target is told to drop its copy meanwhile.
        host.spawn(drop_prepared_copy(reconnect, mid, "source restarted before GO"), name=settling_task_name(mid))
        raise
    # ABORTED and still open: the target has not yet confirmed it holds no copy.
    host.spawn(settle_abort(journal, reconnect, mid, "source restarted before GO"), name=settling_task_name(mid))


async def dial_target(s: Settings, entry: JournalEntry) -> RecordChannel:
    """Dial the migration's target the way the journal says it was dialled."""
    host, port = split_host_port(entry.peer)
    transport: ByteTransport
    if entry.transport == TLS:
        transport = await connect_tls(entry.server_name or host, port, client_context(s), s.handshake_timeout)
    else:
        transport = await connect(host, port, s.handshake_timeout)
    return RecordChannel(transport, Conversation(Role.QUERY), max_frame=s.max_frame, read_timeout=s.idle_timeout)


async def _resolve_in_doubt(host: Host, reconnect: Reconnect, entry: JournalEntry, dom: Domain) -> None:
    migration = SourceMigration.in_doubt(
        dom,
        entry.domain,
        SendOptions(live=entry.live, verify=False, policy=XendPolicy(), recovery_s=0.0, cluster=host.cluster),
        journal=host.journal,
        migration_id=entry.migration_id,
        target=entry.peer,
        reconnect=reconnect,
        hooks=host.hooks,
    )
    result = await migration.resolve()
    log.info("in-doubt migration resolved", migration_id=entry.migration_id, status=result.status, error=result.error)


async def _resolve_without_copy(host: Host, reconnect: Reconnect, entry: JournalEntry) -> None:
    """GO_SENT and no local copy: whatever the target holds is the domain now."""
    journal = host.journal
    mid = entry.migration_id
    lg = log.bind(migration_id=mid, domain=entry.domain)
    backoff = Backoff()
    while True:
        try:
            state, channel = await ask(reconnect, mid)
            try:
                if state in (OutcomeState.RESUMED, OutcomeState.DONE):
                    with contextlib.suppress(RelocdError, OSError):
                        await channel.send(Done())
                    journal.set_phase(mid, Phase.DONE)
                    journal.finish(mid, "completed", "local copy gone at restart; the target runs it")
                    return
                if state == OutcomeState.PREPARED:
                    if host.cluster is not None:  # the target claims only what is offered to it
                        await host.cluster.offer(entry.uuid, entry.domain, mid)
                    await channel.send(Go())  # its copy is the only one left: run it
                    answer = await channel.recv()
                    if isinstance(answer, Resumed) and answer.ok:
                        with contextlib.suppress(RelocdError, OSError):
                            await channel.send(Done())
                        journal.set_phase(mid, Phase.DONE)
                        journal.finish(mid, "completed", "local copy gone at restart; GO re-sent")
                        return
                    lg.error("the target could not resume the only copy: the domain is lost")
                    journal.finish(mid, "failed", "domain lost: local copy gone and the target could not resume")
                    return
                if state in (OutcomeState.ABORTED, OutcomeState.UNKNOWN):
                    lg.error("neither host holds the domain any more: it is lost")
                    journal.finish(mid, "failed", "domain lost: local copy gone at restart, target holds none")
                    return
            finally:
                await channel.close()
        except (RelocdError, OSError) as exc:
            lg.info("cannot reach the target yet", error=str(exc))
        await backoff.wait()


async def _recover_target(ctx: Host, entry: JournalEntry, dom: Domain | None, lg: structlog.BoundLogger) -> None:
    journal = ctx.journal
    mid = entry.migration_id
    if entry.phase == Phase.RESUMED:
        journal.finish(mid, "completed")
        return
    if entry.phase == Phase.STARTING and dom is None and ctx.cluster is not None:
        # With a store the claim came before STARTING: the domain was ours and went with this host.
        lg.error("the incoming copy is gone after its claim: the domain was lost with this host")
        journal.set_phase(mid, Phase.ABORTED)
        journal.finish(mid, "failed", "domain lost: incoming copy gone after its claim in the cluster store")
        return
    if entry.phase == Phase.STARTING and dom is None:
        # The copy may have run here before it was lost (the host lost power):
        # the source's paused copy is older than what ran.  Neither side may
        # decide alone; the entry stays open, the source keeps asking (and
        # hears RECEIVING), and the operator settles it (docs/faults.md).
        lg.error(
            "the incoming copy may have run before this host lost it: the source's copy is older;"
            " left for the operator to settle (see docs/faults.md, 'A copy lost after it ran')"
        )
        return
    if entry.phase in (Phase.RESUMING, Phase.STARTING) or (
        entry.phase == Phase.PREPARED and dom is not None and not dom.name.endswith(INCOMING_SUFFIX)
    ):
        # GO was received (RESUMING is journaled before the rename); a renamed
        # copy at PREPARED is the same window in a journal written before
        # RESUMING existed.  Finish the resume: the source waits for RESUMED.
        if dom is None:
            lg.error("GO was received but the incoming copy is gone (host lost it); answering ABORTED")
            if ctx.cluster is not None:  # it never ran (RESUMING): the source's copy is the domain again
                await ctx.cluster.give_back(entry.uuid, mid)
            journal.set_phase(mid, Phase.ABORTED)
            journal.finish(mid, "failed", "incoming copy gone at restart after GO")
            return
        if entry.phase == Phase.PREPARED:
            journal.set_phase(mid, Phase.RESUMING)
        answer = await finish_resume(ctx, mid, dom, lg, release=lambda m: release_incoming(ctx, m))
        lg.warning("resume interrupted by a restart finished", ok=answer.ok)
        return
    if entry.phase == Phase.PREPARED and dom is not None:
        ctx.in_doubt[mid] = dom
        lg.warning("prepared incoming domain kept paused until its source decides")
        return
    if dom is not None:  # ours (migration_copy never returns the source's): it never ran
        await dom.destroy()
        lg.info("half-received domain destroyed after restart")
    why = "prepared copy gone at restart" if entry.phase == Phase.PREPARED else "daemon restarted while receiving"
    journal.set_phase(mid, Phase.ABORTED)
    journal.finish(mid, "rolled-back", why)

