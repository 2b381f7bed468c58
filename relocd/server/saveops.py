"""Control-socket ops `save`, `restore`, `inspect` (xm save / xm restore).

Handlers take the Daemon, the request args and a progress sink, like the
ops in ``operations.py`` (which registers them).  A save or restore in
flight leaves a small marker in ``<state-dir>/saves/``; should the daemon die
mid-way, ``recover_interrupted`` (called at startup) resumes a domain that a
save had paused, removes the partial file, and destroys a half-restored
domain.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
import uuid as uuidlib
from pathlib import Path
from typing import Any

import structlog

from relocd.cluster.registry import domain_saved, register_domain
from relocd.drivers.base import INCOMING_SUFFIX, DomainState
from relocd.config.settings import Settings
from relocd.engine.host import Host
from relocd.engine.policy import make_policy
from relocd.engine.savefile import SaveControl, inspect_savefile, restore_savefile, save_domain
from relocd.engine.savefile_io import OpenSavefile
from relocd.engine.savefile_stream import open_foreign
from relocd.errors import RelocdError
from relocd.server.jobs import SAVE, Jobs
from relocd.server.requests import arg, progress_to


log = structlog.get_logger("relocd.saveops")

#: The pause a checkpoint aims for unless the request says otherwise.
CHECKPOINT_DOWNTIME_MS = 50


class _Marker:
    """`<state-dir>/saves/<op>-<uuid>.json`: what to undo if the daemon dies mid-way."""

    def __init__(self, settings: Settings, op: str, info: dict[str, Any]) -> None:
        self.path = Path(settings.state_dir) / "saves" / f"{op}-{info['uuid']}.json"
        self.info = dict(info, op=op)

    def __enter__(self) -> _Marker:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.info))
        tmp.replace(self.path)
        return self

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)


async def save(
    host: Host, settings: Settings, args: dict[str, Any], sink: Any, jobs: Jobs | None = None
) -> dict[str, Any]:
    """args: name, file, checkpoint (bool), downtime_ms (optional, checkpoint pause target)."""
    name = arg(args, "name", str)
    file = arg(args, "file", str)
    checkpoint = bool(arg(args, "checkpoint", bool, False))
    s = settings
    # Claimed before the first await, held until the save has concluded.
    dom, claim = host.claim(name, f"save to {file}", moving=True)
    policy = make_policy(
        "downtime",
        downtime_ms=arg(args, "downtime_ms", int, min(s.downtime_ms, CHECKPOINT_DOWNTIME_MS)),
        max_iterations=s.max_iterations,
        max_factor=s.max_factor,
        dirty_threshold=s.dirty_threshold,
    )
    hooks = host.hooks
    info = {"name": name, "uuid": dom.config.uuid, "file": str(Path(file).absolute()),
            "was_running": dom.state == DomainState.RUNNING}  # fmt: skip
    jobs = jobs or Jobs()
    job = jobs.start(SAVE, dom.name)
    job.save = SaveControl()
    observed = _observed(host, "save_finished", domain=name, file=info["file"], checkpoint=checkpoint)
    try:
        with claim, _Marker(settings, "save", info), observed:
            task = job.task = host.start_operation(
                save_domain(dom, file, checkpoint=checkpoint, policy=policy, journal=host.journal,
                            progress=job.progress(progress_to(sink)), hooks=hooks, control=job.save),  # fmt: skip
            )
            try:
                result = await asyncio.shield(task)
            except asyncio.CancelledError:
                if not task.cancelled() or job.abort_reason is None:
                    raise
                # relocd abort: the save undid itself (no file, the domain as it was)
                job.finish({"status": "cancelled", "domain": name, "file": info["file"], "error": job.abort_reason})
                raise SaveCancelled(f"save of {name} cancelled: {job.abort_reason}") from None
    finally:
        jobs.end(job)
    out: dict[str, Any] = result.to_json()
    if out.get("status") == "completed" and not checkpoint:
        # the domain is the file's now: a restore on any host may claim it (docs/cluster.md)
        warning = await domain_saved(host, info["uuid"], name)
        if warning:
            out["warning"] = warning
    job.finish(out)
    return out


class SaveCancelled(RelocdError):
    """`relocd abort` stopped a save before its file was committed."""


@contextlib.contextmanager
def _observed(host: Host, event: str, **fields: Any) -> Iterator[None]:
    """Tell the host's observers how a save or restore ended, and how long it took."""
    t0 = time.monotonic()
    status = "failed"
    error: str | None = None
    try:
        yield
        status = "completed"
    except SaveCancelled as exc:
        status, error = "cancelled", exc.message
        raise
    except RelocdError as exc:
        error = exc.message
        raise
    finally:
        host.notify(event, status=status, seconds=time.monotonic() - t0, error=error, **fields)


async def restore(host: Host, settings: Settings, args: dict[str, Any], sink: Any) -> dict[str, Any]:
    """args: file, verify (bool, optional: also check the memory digest after loading)."""
    file = arg(args, "file", str)
    verify = bool(arg(args, "verify", bool, False))
    # Read the header first so the marker names the domain; restore_savefile
    # checks everything again (trailer, digest: docs/savefile.md, Reading safely).
    name, uuid = _peek(file)
    await register_domain(host, uuid, name, restore=True)  # with a cluster store: ours (a saved one taken), or refused
    observed = _observed(host, "restore_finished", domain=name, file=str(Path(file).absolute()))
    try:
        with _Marker(settings, "restore", {"name": name, "uuid": uuid, "file": file}), observed:
            result = await host.run_to_end(
                restore_savefile(file, host, verify_memory=verify, progress=progress_to(sink))
            )
    except RelocdError:
        if host.find_uuid(uuid) is None:  # nothing runs: the file is still where the domain is
            await domain_saved(host, uuid, name)
        raise
    out: dict[str, Any] = result.to_json()
    return out


def _peek(file: str) -> tuple[str, str]:
    """(name, uuid) of the domain in a savefile, or in an image another toolstack wrote (xl save)."""
    foreign = open_foreign(file)
    if foreign is not None:
        with foreign:
            return foreign.image.config.name, foreign.image.config.uuid
    with OpenSavefile.open(file) as opened:
        return opened.header.name, opened.header.uuid


async def inspect(host: Host, settings: Settings, args: dict[str, Any], sink: Any) -> dict[str, Any]:
    """args: file.  The header, and whether the digest holds (``digest_ok``, ``problem``)."""
    return await inspect_savefile(arg(args, "file", str))


async def recover_interrupted(host: Host, settings: Settings) -> None:
    """Startup: undo what a dead daemon's save or restore left half-done."""
    folder = Path(settings.state_dir) / "saves"
    if not folder.is_dir():
        return
    for marker in sorted(folder.glob("*.json")):
        try:
            info = json.loads(marker.read_text())
            await _undo(host, info)
        except (OSError, ValueError, KeyError, RelocdError) as exc:
            log.error("could not undo an interrupted save/restore", marker=str(marker), error=str(exc))
        marker.unlink(missing_ok=True)


async def _undo(host: Host, info: dict[str, Any]) -> None:
    uuid = str(uuidlib.UUID(info["uuid"]))
    dom = host.find_uuid(uuid)
    if info["op"] == "save":
        final = Path(info["file"])
        for partial in final.parent.glob(f".{final.name}.*.partial"):
            partial.unlink(missing_ok=True)
        if dom is not None and info.get("was_running"):
            # The driver's undo: a resume, or more where its save suspended the guest.
            await dom.undo_send()
            log.warning("save interrupted by a daemon restart: domain resumed", domain=dom.name)
    elif info["op"] == "restore" and dom is not None and dom.name.endswith(INCOMING_SUFFIX):
        await dom.destroy()
        log.warning("restore interrupted by a daemon restart: half-restored domain destroyed", domain=dom.name)
