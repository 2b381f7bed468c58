"""Migrations and saves in flight, as operators see them: abort, job (watch), migrate-set, history.

Every outgoing migration or save is a ``Job`` from the moment its op claims
the domain until it has concluded.  A job fans its progress out to whoever
watches (`relocd job NAME` from any terminal, besides the one that started
it) and keeps its latest event, so a late watcher sees where it stands at
once.  ``abort`` never awaits before it has acted: a migration refuses it
once its handoff began (past GO), a save once its file is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from relocd.engine.host import Host
from relocd.engine.result import Progress
from relocd.engine.savefile import SaveControl
from relocd.engine.source import SourceMigration
from relocd.errors import ConfigError, DomainBusy, RelocdError
from relocd.server.requests import arg
from relocd.units import parse_rate

log = structlog.get_logger("relocd.jobs")

MIGRATE = "migrate"
SAVE = "save"
#: Events a slow watcher may fall behind by before the oldest are dropped.
WATCH_QUEUE = 64
#: How long `relocd abort` waits for the aborted jobs to end before it answers.
ABORT_WAIT_S = 60.0


@dataclasses.dataclass
class Job:
    kind: str
    name: str
    started_at: float = dataclasses.field(default_factory=time.time)
    #: set once the migration object exists (after the connection opened)
    migration: SourceMigration | None = None
    migration_id: str | None = None
    save: SaveControl | None = None
    task: asyncio.Task[Any] | None = None
    last: dict[str, Any] | None = None
    abort_reason: str | None = None
    #: what the op answered (the result's JSON), for `relocd job`
    answer: asyncio.Future[dict[str, Any]] = dataclasses.field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    _watchers: set[asyncio.Queue[dict[str, Any]]] = dataclasses.field(default_factory=set)

    def progress(self, forward: Progress) -> Progress:
        """A progress callback that tells ``forward`` (the op's client) and every watcher."""

        async def emit(**fields: Any) -> None:
            fields.setdefault("domain", self.name)
            if self.migration_id is not None:
                fields.setdefault("migration_id", self.migration_id)
            self.last = fields
            for q in list(self._watchers):
                if q.full():
                    with contextlib.suppress(asyncio.QueueEmpty):
                        q.get_nowait()  # lossy by design, as the control socket is
                q.put_nowait(fields)
            await forward(**fields)

        return emit

    def abort(self, why: str) -> None:
        """Cancel before the point of no return (never awaits); DomainBusy after it."""
        if self.migration is not None:
            self.migration.request_abort(why)
            return
        if self.save is not None and self.save.committed:
            raise DomainBusy(f"the save of {self.name} is committed: its file is complete")
        if self.abort_reason is None:
            self.abort_reason = why
            if self.task is not None:
                self.task.cancel()

    def finish(self, answer: dict[str, Any]) -> None:
        if not self.answer.done():
            self.answer.set_result(answer)

    @contextlib.contextmanager
    def watching(self) -> Any:
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue(WATCH_QUEUE)
        self._watchers.add(q)
        try:
            yield q
        finally:
            self._watchers.discard(q)


class Jobs:
    """The jobs in flight, by domain name (one at a time per domain: the claim sees to that)."""

    def __init__(self) -> None:
        self._by_name: dict[str, Job] = {}
        #: `relocd evacuate`s in flight (their ``stopped`` event; abort --all sets it)
        self.evacuations: set[Any] = set()

    def start(self, kind: str, name: str) -> Job:
        job = Job(kind, name)
        self._by_name[name] = job
        return job

    def end(self, job: Job) -> None:
        if self._by_name.get(job.name) is job:
            del self._by_name[job.name]

    def get(self, name: str) -> Job:
        job = self._by_name.get(name)
        if job is None:
            raise RelocdError(f"no migration or save of {name!r} in flight")
        return job

    def all(self) -> list[Job]:
        return list(self._by_name.values())


# -- the ops ----------------------------------------------------------------------


async def abort(jobs: Jobs, args: dict[str, Any], sink: Any) -> dict[str, Any]:
    """args: name, or all=true.  Answers once the aborted jobs have ended."""
    if arg(args, "all", bool, False):
        for evac in jobs.evacuations:
            evac.stopped.set()  # queued moves never start
        targets = jobs.all()
    else:
        targets = [jobs.get(arg(args, "name", str))]
    aborted: list[Job] = []
    refused: dict[str, str] = {}
    for job in targets:
        try:
            job.abort("cancelled by the operator")
        except DomainBusy as exc:
            refused[job.name] = exc.message
            continue
        aborted.append(job)
        log.info("abort requested", domain=job.name, kind=job.kind)
    if not args.get("all") and refused:
        raise DomainBusy(next(iter(refused.values())))
    waiting = [j.answer for j in aborted]
    if waiting:
        await asyncio.wait(waiting, timeout=ABORT_WAIT_S)
    return {
        "aborted": [j.name for j in aborted],
        "refused": refused,
        "results": {j.name: j.answer.result() for j in aborted if j.answer.done()},
    }


async def watch(jobs: Jobs, args: dict[str, Any], sink: Any) -> dict[str, Any]:
    """`relocd job NAME`: the job's progress as it goes, then the result its op answered."""
    job = jobs.get(arg(args, "name", str))
    with job.watching() as q:
        if job.last is not None:
            await sink.emit(**job.last)
        while not job.answer.done():
            getter = asyncio.ensure_future(q.get())
            done, _ = await asyncio.wait({getter, job.answer}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                await sink.emit(**getter.result())
            else:
                getter.cancel()
    return job.answer.result()


async def migrate_set(jobs: Jobs, args: dict[str, Any], sink: Any) -> dict[str, Any]:
    """args: name, downtime_ms (int), max_bandwidth (rate text): the next round uses them."""
    name = arg(args, "name", str)
    job = jobs.get(name)
    downtime = arg(args, "downtime_ms", int, None)
    bw_text = arg(args, "max_bandwidth", str, None)
    if downtime is None and bw_text is None:
        raise ConfigError("say what to change: --downtime-ms and/or --max-bandwidth")
    if downtime is not None and downtime <= 0:
        raise ConfigError("--downtime-ms must be positive")
    try:
        bandwidth = parse_rate(bw_text) if bw_text else None
    except ValueError as exc:
        raise ConfigError(f"--max-bandwidth: {exc}") from None
    mig = job.migration
    if job.kind != MIGRATE or mig is None:
        raise RelocdError(f"{name} is not being migrated (a {job.kind}, or still connecting)")
    if mig.past_go:
        raise DomainBusy(f"{name} is past GO: nothing left to tune")
    mig.set_limits(downtime_ms=downtime, max_bandwidth=bandwidth)
    log.info("migration parameters changed", domain=name, downtime_ms=downtime, max_bandwidth=bandwidth)
    policy_downtime = getattr(mig.opts.policy, "downtime_ms", None)
    return {"name": name, "downtime_ms": policy_downtime, "max_bandwidth": mig.opts.max_bandwidth}


async def history(host: Host, args: dict[str, Any], sink: Any) -> list[dict[str, Any]]:
    """args: name (optional), limit (default 50): finished migrations, saves and restores."""
    limit = arg(args, "limit", int, 50)
    if limit <= 0:
        raise ConfigError("--limit must be positive")
    return await asyncio.to_thread(host.journal.history, arg(args, "name", str, None), limit)


def record_history(host: Host) -> Callable[[str, dict[str, Any]], None]:
    """A Host observer that writes each finished migration, save and restore to the journal."""

    def observe(event: str, fields: dict[str, Any]) -> None:
        now = time.time()
        if event == "migration_finished":
            res = fields.get("result") or {}
            direction = fields.get("direction")
            kind = MIGRATE if direction == "outgoing" else "incoming"
            domain = res.get("domain") or fields.get("domain")
            if not domain:
                return
            started = now - float(res.get("total_ms") or 0) / 1000 if res else float(fields.get("started_at") or now)
            record = {
                "migration_id": res.get("migration_id") or fields.get("migration_id"),
                "peer": res.get("target") or fields.get("peer"),
                "live": res.get("live", fields.get("live")),
                "status": fields.get("status"),
                "iterations": res.get("iterations"),
                "bytes_sent": res.get("bytes_sent"),
                "downtime_ms": res.get("downtime_ms"),
                "stop_reason": res.get("stop_reason"),
                "error": res.get("error") or fields.get("error"),
            }
        elif event in ("save_finished", "restore_finished"):
            kind = SAVE if event == "save_finished" else "restore"
            domain = fields.get("domain")
            if not domain:
                return
            started = now - float(fields.get("seconds") or 0)
            record = {"peer": fields.get("file"), "status": fields.get("status"), "error": fields.get("error"),
                      "live": fields.get("checkpoint")}  # fmt: skip
        else:
            return
        try:
            host.journal.add_history(kind, str(domain), started, now, record)
        except RelocdError as exc:
            log.warning("could not record history", error=exc.message)

    return observe


Handler = Callable[[dict[str, Any], Any], Awaitable[Any]]
