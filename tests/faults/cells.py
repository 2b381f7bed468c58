"""One cell of the fault matrix: a live migration, one fault at one phase, recovery, the invariant.

Shared by ``test_fault_matrix.py`` (each cell once) and ``bench/fault_soak.py``
(all cells, many times).  The invariant, checked after recovery settles:

* the domain (by uuid) is listed ``running`` exactly once across both daemons,
  and nowhere in any other state;
* no ``NAME--incoming`` / ``NAME--migratedaway`` domain, and no incoming or
  outgoing migration, reservation or in-doubt migration is left on either
  daemon (op ``status``'s counts, all 0);
* its memory verifies (op ``check``);
* it can migrate again, straight to the other host (so neither daemon holds a
  stale reservation, name or uuid for it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "daemon"))

from harness import DaemonProc  # type: ignore[import-not-found]
from proxy import PHASE_TRIGGERS, Action, Fault, FaultProxy

from relocd.drivers.base import INCOMING_SUFFIX, MIGRATED_AWAY_SUFFIX
from relocd.engine.faults import PHASES
from relocd.errors import RelocdError

KILL_SOURCE = "kill-source"
KILL_TARGET = "kill-target"
FAULTS = (KILL_SOURCE, KILL_TARGET, Action.CUT.value, Action.CORRUPT.value, Action.STALL.value)

#: Small timeouts so a silent peer is noticed in seconds, not minutes; xend's
#: precopy rules with a hotset so there always is a second round.
FAST_OPTIONS = {
    "relocd-handshake-timeout": "3",
    "relocd-idle-timeout": "3",
    "relocd-reservation-timeout": "5",
    "relocd-precopy-policy": "xend",
    "relocd-max-iterations": "4",
    "relocd-dirty-threshold": "0",  # never stop after round 1: precopy-2 must happen
}
WORKLOAD = "hotset:size=8MiB,rate=40MB/s"
DOMAIN = "web"
#: How long a cell may take from the fault to a settled invariant.
SETTLE_S = 40.0


@dataclasses.dataclass
class CellOutcome:
    fault: str
    phase: str
    status: str = "?"  # the migrate op's status, or "source killed"
    ended_on: str = "?"  # "source", "target" or "nowhere/twice"
    fired: str = ""  # what the fault actually hit
    problems: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        head = f"{self.fault:>12} @ {self.phase:<13} {self.status:<14} runs on {self.ended_on:<7}"
        tail = "ok" if self.ok else "FAIL: " + "; ".join(self.problems)
        return f"{head} {self.seconds:5.1f}s  [{self.fired}] {tail}"


class FaultyDaemon(DaemonProc):  # type: ignore[misc]
    """A DaemonProc whose next start() runs with RELOCD_FAULT set (once)."""

    fault_spec: str | None = None

    def __init__(self, root: Path, name: str, address: str) -> None:
        extra = "\n".join(f"({opt} {value})" for opt, value in FAST_OPTIONS.items())
        super().__init__(root, name, address, extra_config=extra)

    def start(self, timeout: float = 30.0) -> None:
        spec, self.fault_spec = self.fault_spec, None
        self.env = {"RELOCD_FAULT": spec} if spec else {}
        super().start(timeout)


@contextlib.contextmanager
def daemon_pair(root: Path) -> Iterator[tuple[FaultyDaemon, FaultyDaemon]]:
    a = FaultyDaemon(root, "hostA", "127.0.0.1")
    b = FaultyDaemon(root, "hostB", "127.0.0.2")
    try:
        yield a, b
    finally:
        a.cleanup()
        b.cleanup()


async def _call(d: DaemonProc, op: str, **args: Any) -> Any:
    return await asyncio.wait_for(d.call(op, **args), 30)


#: status counts that must all be 0 once a cell has settled
LEFT_OVER = (
    ("incoming", "incoming migration(s)"),
    ("outgoing", "outgoing migration(s)"),
    ("reservations", "reservation(s)"),
    ("in_doubt", "in-doubt migration(s)"),
)


async def invariant_problems(a: DaemonProc, b: DaemonProc, uuid: str) -> tuple[list[str], DaemonProc | None]:
    """What is wrong right now (empty when the invariant holds), and the host running the domain."""
    problems: list[str] = []
    running: list[DaemonProc] = []
    for d in (a, b):
        if not d.alive:
            problems.append(f"{d.name} is down")
            continue
        for x in await _call(d, "list"):
            if x["name"].endswith((INCOMING_SUFFIX, MIGRATED_AWAY_SUFFIX)):
                problems.append(f"{d.name} holds {x['name']} ({x['state']})")
            elif x["uuid"] == uuid and x["state"] == "running":
                running.append(d)
            elif x["uuid"] == uuid:
                problems.append(f"{d.name} holds {x['name']} {x['state']}")
        status = await _call(d, "status")
        for key, what in LEFT_OVER:
            count = status.get(key)
            if count is None:
                problems.append(f"{d.name}'s status has no {key!r} count")
            elif count:
                problems.append(f"{d.name} reports {count} {what}")
    if len(running) != 1:
        problems.append(f"domain running on {len(running)} hosts")
    return problems, running[0] if len(running) == 1 else None


async def _settle(a: DaemonProc, b: DaemonProc, uuid: str, deadline: float) -> tuple[list[str], DaemonProc | None]:
    while True:
        try:
            problems, host = await invariant_problems(a, b, uuid)
        except (RelocdError, OSError, TimeoutError) as exc:  # a daemon restarting: try again
            problems, host = [f"control call failed: {exc}"], None
        if not problems or time.monotonic() > deadline:
            return problems, host
        await asyncio.sleep(0.3)


async def _wait_death_or(d: DaemonProc, task: asyncio.Future[Any], timeout: float) -> bool:
    """True once d died; False if task finished first (or timeout)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not d.alive:
            return True
        if task.done():
            await asyncio.sleep(0.3)  # a kill right at the end of the migration
            return not d.alive
        await asyncio.sleep(0.05)
    return False


async def run_cell(root: Path, fault: str, phase: str, *, memory_mib: int = 32, migrate_again: bool = True) -> CellOutcome:
    """Run one cell in fresh daemons under ``root``; never raises for a broken invariant."""
    assert fault in FAULTS and phase in PHASES, (fault, phase)
    out = CellOutcome(fault, phase)
    t0 = time.monotonic()
    root.mkdir(parents=True, exist_ok=True)
    with daemon_pair(root) as (a, b):
        victim = {KILL_SOURCE: a, KILL_TARGET: b}.get(fault)
        if victim is not None:
            victim.fault_spec = f"{'source' if victim is a else 'target'}:{phase}:kill"
        await asyncio.gather(asyncio.to_thread(a.start), asyncio.to_thread(b.start))
        created = await _call(a, "create", name=DOMAIN, memory=memory_mib, workload=WORKLOAD)
        uuid = created["uuid"]
        proxy: FaultProxy | None = None
        host, port = b.address, b.port
        if victim is None:
            proxy = await FaultProxy("127.0.0.1", (b.address, b.port), Fault(PHASE_TRIGGERS[phase], Action(fault))).start()
            host, port = "127.0.0.1", proxy.port
        try:
            await asyncio.sleep(0.3)  # let the workload dirty some pages
            migration = asyncio.ensure_future(a.call("migrate", name=DOMAIN, host=host, port=port, live=True, verify=True))
            if victim is not None:
                if await _wait_death_or(victim, migration, 30):
                    out.fired = f"{victim.name} killed"
                    await asyncio.to_thread(victim.start)
                else:
                    out.fired = "fault point not reached"
                    out.problems.append("the daemon was not killed at its fault point")
            try:
                result = await asyncio.wait_for(migration, SETTLE_S)
                out.status = result["status"]
            except TimeoutError:
                out.status = "hung"
                out.problems.append(f"migrate did not return within {SETTLE_S:g} s")
            except (RelocdError, OSError) as exc:
                out.status = "source killed" if fault == KILL_SOURCE else "error"
                if fault != KILL_SOURCE:
                    out.problems.append(f"migrate op failed: {exc}")
            if proxy is not None:
                fired = proxy.fired
                out.fired = "not reached" if fired is None else f"{fired.action.value} {fired.record}" + (
                    f" r{fired.round}" if fired.round is not None else ""
                )
                if fired is None:
                    out.problems.append("the proxy never saw its trigger record")
            problems, runner = await _settle(a, b, uuid, time.monotonic() + SETTLE_S)
            out.problems += problems
            out.ended_on = "source" if runner is a else "target" if runner is b else "nowhere/twice"
            if runner is not None:
                check = await _call(runner, "check", name=DOMAIN)
                if not check["ok"]:
                    out.problems.append(f"memory does not verify: {check['problem']}")
                if migrate_again and not out.problems:
                    other = b if runner is a else a
                    again = await asyncio.wait_for(
                        runner.call("migrate", name=DOMAIN, host=other.address, port=other.port, live=True), 60
                    )
                    if again["status"] != "completed":
                        out.problems.append(f"cannot migrate it again: {again['error']}")
                    else:
                        check = await _call(other, "check", name=DOMAIN)
                        if not check["ok"]:
                            out.problems.append(f"memory does not verify after migrating again: {check['problem']}")
        finally:
            if proxy is not None:
                await proxy.close()
    out.seconds = round(time.monotonic() - t0, 1)
    return out
