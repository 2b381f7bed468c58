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

from typing import TYPE_CHECKING

import structlog

from relocd.drivers.base import (
    INCOMING_SUFFIX,
    MIGRATED_AWAY_SUFFIX,
    Domain,
    DomainState,
)
from relocd.engine.journal import JournalEntry, Phase
from relocd.engine.policy import XendPolicy
from relocd.engine.source import SendOptions, SourceMigration, drop_prepared_copy
from relocd.engine.stream import RecordChannel
from relocd.engine.streamed import uses_stream
from relocd.errors import RelocdError
from relocd.protocol.records import Role
from relocd.protocol.state import Conversation
from relocd.server.transport import connect

if TYPE_CHECKING:
    from relocd.server.daemon import Daemon

log = structlog.get_logger("relocd.recovery")

#: a restarted source keeps asking a silent target for this long
IN_DOUBT_RETRY_S = 7 * 24 * 3600.0
#: a restarted source keeps telling an unreachable target to drop a prepared copy this long
ROLLBACK_RETRY_S = 3600.0


def split_host_port(text: str) -> tuple[str, int]:
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
    else:
        host, _, port = text.rpartition(":")
    return host, int(port)


def _find(daemon: Daemon, uuid: str) -> Domain | None:
    for d in daemon.all_domains():
        if d.config.uuid == uuid:
            return d
    return None


async def recover_unfinished(daemon: Daemon) -> None:
    journal = daemon.journal
    assert journal is not None and daemon.ctx is not None
    for entry in journal.unfinished():
        lg = log.bind(migration_id=entry.migration_id, domain=entry.domain, phase=str(entry.phase))
        dom = _find(daemon, entry.uuid)
        try:
            if entry.role == "source":
                await _recover_source(daemon, entry, dom, lg)
            else:
                await _recover_target(daemon, entry, dom, lg)
        except RelocdError as exc:
            lg.error("recovery step failed", error=exc.message)


async def _recover_source(daemon: Daemon, entry: JournalEntry, dom: Domain | None, lg: structlog.BoundLogger) -> None:
    journal = daemon.journal
    assert journal is not None
    if entry.phase == Phase.DONE:
        # Crashed between DONE and finish(): the target runs it, ours is gone.
        journal.finish(entry.migration_id, "completed")
        return
    if entry.phase == Phase.GO_SENT:
        if dom is None:
            lg.warning("GO was sent and the local copy is gone; nothing to do here")
            journal.finish(entry.migration_id, "completed", "local copy already gone at restart")
            return
        lg.warning("migration in doubt after restart: keeping the domain paused and asking the target")
        daemon.spawn(_resolve_in_doubt(daemon, entry, dom))
        return
    # Before GO: ours is the only copy that may run.
    if dom is not None:
        if dom.name != entry.domain and dom.name.endswith(MIGRATED_AWAY_SUFFIX):
            await dom.rename(entry.domain)
        if uses_stream(dom):
            # A stream domain may have been suspended by its driver's save (a
            # Xen PV guest): only the driver's own undo brings it back.
            await dom.cancel_send()  # type: ignore[attr-defined]
        elif dom.state == DomainState.PAUSED:
            await dom.resume()
        lg.info("interrupted migration rolled back: domain resumed here")
    journal.set_phase(entry.migration_id, Phase.ABORTED)
    journal.finish(entry.migration_id, "rolled-back", "daemon restarted before GO")
    daemon.spawn(_tell_target_abort(daemon, entry))


async def _open(daemon: Daemon, peer: str) -> RecordChannel:
    s = daemon.settings
    host, port = split_host_port(peer)
    transport = await connect(host, port, s.handshake_timeout)
    return RecordChannel(transport, Conversation(Role.QUERY), max_frame=s.max_frame, read_timeout=s.idle_timeout)


async def _tell_target_abort(daemon: Daemon, entry: JournalEntry) -> None:
    """A target holding a prepared copy must drop it now; keep asking while it is unreachable."""
    await drop_prepared_copy(
        lambda: _open(daemon, entry.peer), entry.migration_id, "source restarted before GO", ROLLBACK_RETRY_S
    )


async def _resolve_in_doubt(daemon: Daemon, entry: JournalEntry, dom: Domain) -> None:
    migration = SourceMigration.in_doubt(
        dom,
        entry.domain,
        SendOptions(live=entry.live, verify=False, policy=XendPolicy(), recovery_s=IN_DOUBT_RETRY_S),
        journal=daemon.journal,  # type: ignore[arg-type]
        migration_id=entry.migration_id,
        target=entry.peer,
        reconnect=lambda: _open(daemon, entry.peer),
        hooks=daemon.ctx.hooks if daemon.ctx else None,
    )
    result = await migration.resolve()
    log.info("in-doubt migration resolved", migration_id=entry.migration_id, status=result.status, error=result.error)


async def _recover_target(daemon: Daemon, entry: JournalEntry, dom: Domain | None, lg: structlog.BoundLogger) -> None:
    journal = daemon.journal
    ctx = daemon.ctx
    assert journal is not None and ctx is not None
    if entry.phase == Phase.PREPARED and dom is not None and dom.name.endswith(INCOMING_SUFFIX):
        ctx.in_doubt[entry.migration_id] = dom
        lg.warning("prepared incoming domain kept paused until its source decides")
        return
    if entry.phase == Phase.RESUMED:
        journal.finish(entry.migration_id, "completed")
        return
    if dom is not None and dom.name.endswith(INCOMING_SUFFIX):
        await dom.destroy()
        lg.info("half-received domain destroyed after restart")
    journal.set_phase(entry.migration_id, Phase.ABORTED)
    journal.finish(entry.migration_id, "rolled-back", "daemon restarted while receiving")

