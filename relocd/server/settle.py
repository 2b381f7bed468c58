"""`relocd settle ID --keep-here | --drop-here`: an operator ends an in-doubt migration by hand.

For the one case relocd cannot decide alone: the peer is gone for good (its
host lost with its state directory), or the target lost a copy that may
have run (docs/faults.md, "What is guaranteed, and what needs an operator").
Guarded: refused while the peer answers and can settle the migration itself
(a source's target that answers QUERY with anything but RECEIVING; a
target's source whose relocation port accepts connections).  ``--force``
overrides the RECEIVING case only, where a target waits for the operator.

* ``keep-here``: this host's copy becomes the domain (a source resumes its
  paused copy under its own name; a target resumes its prepared copy).
* ``drop-here``: this host's copy goes (destroyed), the other host's is the
  domain.
Either way the entry is closed with the operator's decision in its error.
"""

from __future__ import annotations

import asyncio
import uuid as uuidlib
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from relocd.drivers.base import INCOMING_SUFFIX, MIGRATED_AWAY_SUFFIX
from relocd.engine.host import Host
from relocd.engine.journal import SOURCE, JournalEntry, Phase
from relocd.engine.query import ask
from relocd.engine.source import settling_task_name
from relocd.engine.stream import RecordChannel
from relocd.engine.target_resume import finish_resume, release_incoming
from relocd.errors import ConfigError, DomainBusy, RelocdError
from relocd.protocol.records import OutcomeState
from relocd.server.requests import arg

log = structlog.get_logger("relocd.settle")

KEEP_HERE = "keep-here"
DROP_HERE = "drop-here"
#: How long the guard waits for the peer to answer before it counts as gone.
PROBE_S = 5.0

Dial = Callable[[JournalEntry], Awaitable[RecordChannel]]
Reachable = Callable[[str], Awaitable[bool]]


async def settle(host: Host, dial: Dial, reachable: Reachable, args: dict[str, Any], sink: Any) -> dict[str, Any]:
    """args: migration_id, action (keep-here | drop-here), force (bool)."""
    try:
        mid = str(uuidlib.UUID(arg(args, "migration_id", str)))
    except ValueError:
        raise ConfigError("settle: a migration id (relocd history or the logs name it)") from None
    action = arg(args, "action", str)
    if action not in (KEEP_HERE, DROP_HERE):
        raise ConfigError(f"settle: --{KEEP_HERE} or --{DROP_HERE}")
    force = bool(arg(args, "force", bool, False))
    entry = host.journal.get(mid)
    if entry is None or entry.finished:
        raise RelocdError(f"migration {mid} is not in doubt here ({'finished' if entry else 'unknown'})")
    await _guard(entry, dial, reachable, force)
    settling = [t for t in asyncio.all_tasks() if t.get_name() == settling_task_name(mid)]
    for task in settling:
        task.cancel()  # the resolver that keeps asking: the operator decides now
        await asyncio.gather(task, return_exceptions=True)
    copy = host.migration_copy(entry)
    why = f"settled by the operator: {action}"
    if entry.role == SOURCE:
        claim = host.claims.get(entry.uuid)
        if copy is not None and action == KEEP_HERE:
            if copy.name.endswith(MIGRATED_AWAY_SUFFIX):
                await copy.rename(entry.domain)
            await copy.undo_send()
            await host.hooks.resumed_here(copy)
        elif copy is not None:
            await copy.destroy()
            await host.hooks.destroyed(copy)
        if claim is not None:
            claim.release()
        if entry.phase != Phase.ABORTED and action == KEEP_HERE:
            host.journal.set_phase(mid, Phase.ABORTED)
        host.journal.finish(mid, "rolled-back" if action == KEEP_HERE else "completed", why)
    else:
        if action == KEEP_HERE:
            if copy is None:
                raise RelocdError(f"migration {mid}: no copy of {entry.domain} here to keep")
            if entry.phase == Phase.PREPARED:
                host.journal.set_phase(mid, Phase.RESUMING)
            answer = await finish_resume(host, mid, copy, log.bind(migration_id=mid),
                                         release=lambda m: release_incoming(host, m))  # fmt: skip
            if not answer.ok:
                raise RelocdError(f"migration {mid}: the copy could not be resumed: {answer.details.get('error')}")
            host.journal.finish(mid, "completed", why)
        else:
            if copy is not None and copy.name.endswith(INCOMING_SUFFIX):
                await copy.destroy()
                await host.hooks.destroyed(copy)
            release_incoming(host, mid)
            host.journal.set_phase(mid, Phase.ABORTED)
            host.journal.finish(mid, "rolled-back", why)
    log.warning("in-doubt migration settled by hand", migration_id=mid, role=entry.role, action=action)
    return {"migration_id": mid, "role": entry.role, "domain": entry.domain, "action": action}


async def _guard(entry: JournalEntry, dial: Dial, reachable: Reachable, force: bool) -> None:
    """Refuse while the peer can settle it itself."""
    if entry.role == SOURCE:
        try:
            async with asyncio.timeout(PROBE_S):
                state, channel = await ask(lambda: dial(entry), entry.migration_id)
                await channel.close()
        except (RelocdError, OSError, TimeoutError):
            return  # gone: the operator decides
        if state == OutcomeState.RECEIVING and force:
            return
        hint = " (--force: it waits for the operator)" if state == OutcomeState.RECEIVING else ""
        raise DomainBusy(f"the target {entry.peer} answers ({state.name}): relocd settles this itself{hint}")
    if await reachable(entry.peer):
        raise DomainBusy(f"the source {entry.peer} is reachable: it settles this migration itself")
