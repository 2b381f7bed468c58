"""Every crash point, found by the harness: trace one clean migration, then fault each point it reached.

The fault matrix (``cells.py``) faults nine phases picked by hand.  Here the
points come from the daemons themselves: ``relocd/engine/faults.py`` places a
crash point before and after every journal write and around every record
sent or received, and ``RELOCD_FAULT_TRACE`` makes both daemons list the
points one clean migration reaches (``discover``).  Every point then meets
every fault kind (``cells_of``), one cell each (``run_crash_cell``):

* ``kill-source`` / ``kill-target``: that daemon dies by SIGKILL at the point.
  When the point is its own it kills itself there (``RELOCD_FAULT=...:kill``);
  when it is the peer's, the peer stops at the point (``...:hold``) while the
  harness SIGKILLs the daemon, then goes on;
* ``kill-both``: the point's daemon stops there, the harness SIGKILLs it, then
  the other one, by PID;
* ``cut-plain`` / ``cut-tls``: the migration runs through ``proxy.FaultProxy``
  (over the plain listener, or the TLS one with certificates from
  ``relocd.tools.certs``); the point's daemon stops there while the harness
  cuts the link, then goes on.  Later connections (the recovery QUERY) pass:
  the link heals.

Then whatever was killed is restarted (without the fault), and the cell
checks the invariant of ``cells.py`` (``invariant_problems``: the domain runs
on exactly one host, nothing half-built or in flight), that its memory
verifies and that it migrates again; and the direction where the trace
decides it (``PointMap.expected_host``).

With ``store`` (an etcd URL: ``test_crash_points_store.py``, ``bench/fault_points.py
--store``) both daemons arbitrate by the cluster store, the trace has its
``store:*`` points too, and the cell also checks that the ownership record
names the host the domain runs on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hashlib
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cells import DOMAIN, FAST_OPTIONS, SETTLE_S, WORKLOAD, invariant_problems
from harness import DaemonProc, free_port  # type: ignore[import-not-found]
from proxy import FaultProxy

from relocd.errors import RelocdError

KILL_SOURCE = "kill-source"
KILL_TARGET = "kill-target"
KILL_BOTH = "kill-both"
CUT_PLAIN = "cut-plain"
CUT_TLS = "cut-tls"
FAULT_KINDS = (KILL_SOURCE, KILL_TARGET, KILL_BOTH, CUT_PLAIN, CUT_TLS)
SIDES = ("source", "target")

#: The two durable facts that decide where the domain must end up.
DECISION = ("source", "journal:go-sent:done")
RESUMED = ("target", "journal:resumed:done")

#: How many cells CI runs (a different slice each day); RELOCD_CRASH_ALL=1 runs all.
CI_SAMPLE = 6


@dataclasses.dataclass(frozen=True)
class Point:
    side: str
    name: str

    def __str__(self) -> str:
        return f"{self.side}:{self.name}"

    @classmethod
    def parse(cls, text: str) -> Point:
        side, _, name = text.partition(":")
        if side not in SIDES or not name:
            raise ValueError(f"not a crash point: {text!r} (SIDE:NAME)")
        return cls(side, name)


@dataclasses.dataclass(frozen=True)
class Cell:
    fault: str
    point: Point

    @property
    def id(self) -> str:
        return f"{self.fault}@{self.point}"

    @classmethod
    def parse(cls, text: str) -> Cell:
        fault, _, point = text.partition("@")
        if fault not in FAULT_KINDS:
            raise ValueError(f"not a fault kind: {fault!r} (one of {', '.join(FAULT_KINDS)})")
        return cls(fault, Point.parse(point))


def parse_trace(text: str) -> list[Point]:
    """The points of a trace file (``SIDE NAME`` lines), first occurrence each, in order."""
    seen: dict[Point, None] = {}
    for line in text.splitlines():
        side, _, name = line.strip().partition(" ")
        if side in SIDES and name:
            seen.setdefault(Point(side, name), None)
    return list(seen)


class PointMap:
    """The points one clean migration reached, in the order the trace saw them, and what follows from what.

    Happens-before: a point precedes the later points of its own daemon, and
    ``send:X`` (before the write) precedes the peer's ``recv:X``.  A fault at
    a point removes what needed the faulted party to act after it; the
    expected host follows from whether the source's decision (go-sent on
    disk) can still happen, or the target's resume was on disk before.
    """

    def __init__(self, points: Sequence[Point]) -> None:
        self.points = list(points)
        self._index = {p: i for i, p in enumerate(self.points)}
        self._after: dict[Point, set[Point]] = {p: set() for p in self.points}
        for side in SIDES:
            mine = [p for p in self.points if p.side == side]
            for a, b in zip(mine, mine[1:]):
                self._after[a].add(b)
        for p in self.points:
            if p.name.startswith("send:") and not p.name.endswith(":done"):
                peer = Point(_other(p.side), "recv:" + p.name.removeprefix("send:"))
                if peer in self._index:
                    self._after[p].add(peer)

    def _reach(self, starts: Iterable[Point]) -> set[Point]:
        """Everything at or after any of ``starts``."""
        todo = list(starts)
        seen = set(todo)
        while todo:
            for q in self._after[todo.pop()]:
                if q not in seen:
                    seen.add(q)
                    todo.append(q)
        return seen

    def removed_by(self, cell: Cell) -> set[Point]:
        """The points that cannot happen (in this run's flow) once the cell's fault hits."""
        p = cell.point
        after_p = self._reach([p])
        killed = {
            KILL_SOURCE: {"source"},
            KILL_TARGET: {"target"},
            KILL_BOTH: {"source", "target"},
        }.get(cell.fault, set())
        lost: set[Point] = set()
        if p.side in killed:
            lost |= {q for q in after_p if q != p}
        for side in killed - {p.side}:
            lost |= {q for q in after_p if q.side == side}  # needs the dead peer to act after p
        if cell.fault in (CUT_PLAIN, CUT_TLS):
            # every record sent from p on is lost: the receiving points go
            lost |= {
                Point(_other(q.side), "recv:" + q.name.removeprefix("send:"))
                for q in after_p
                if q.name.startswith("send:") and not q.name.endswith(":done")
            }
        return self._reach(lost & set(self.points))

    def expected_host(self, cell: Cell) -> str | None:
        """'source' or 'target' where the trace decides it, None where either is correct."""
        decision, resumed = Point(*DECISION), Point(*RESUMED)
        if resumed in self._index and cell.point in self._reach([resumed]):
            return "target"
        if decision in self._index and decision in self.removed_by(cell):
            return "source"
        return None


def _other(side: str) -> str:
    return "target" if side == "source" else "source"


def cells_of(points: Iterable[Point], faults: Sequence[str] = FAULT_KINDS) -> list[Cell]:
    return [Cell(f, p) for p in points for f in faults]


def rotation(cells: Sequence[Cell], k: int, turn: int) -> list[Cell]:
    """The turn-th slice of k cells out of a fixed shuffle: consecutive turns cover every cell."""
    order = sorted(cells, key=lambda c: hashlib.sha256(c.id.encode()).digest())
    if not order:
        return []
    start = (turn * k) % len(order)
    return [order[(start + i) % len(order)] for i in range(min(k, len(order)))]


def todays_turn() -> int:
    """RELOCD_CRASH_TURN, or today's date (so CI runs a new slice each day and repeats it within one)."""
    text = os.environ.get("RELOCD_CRASH_TURN", "")
    return int(text) if text else datetime.date.today().toordinal()


# -- daemons ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Pki:
    """A CA and the two hosts' certificates (each names its host's address)."""

    ca: Path
    certs: dict[str, tuple[Path, Path]]  # host name -> (cert, key)

    @classmethod
    def make(cls, directory: Path) -> Pki:
        from relocd.tools.certs import make_ca, make_host_cert

        ca = make_ca(directory)
        certs = {}
        for name, address in (("hostA", "127.0.0.1"), ("hostB", "127.0.0.2")):
            files = make_host_cert(directory, name, ips=(address,))
            certs[name] = (files.cert, files.key)
        return cls(ca.cert, certs)


class PointDaemon(DaemonProc):  # type: ignore[misc]
    """A daemon with the cells' fast options, a TLS listener, and environment for its next start only."""

    def __init__(self, root: Path, name: str, address: str, pki: Pki, store: str | None = None) -> None:
        self.ssl_port = free_port(address)
        cert, key = pki.certs[name]
        extra = "\n".join(f"({opt} {value})" for opt, value in FAST_OPTIONS.items())
        if store is not None:
            extra += f"\n(relocd-cluster-store '{store}')\n(relocd-cluster-name {name})\n(relocd-cluster-timeout 1)"
        extra += f"""
(xend-relocation-ssl-server yes)
(xend-relocation-ssl-port {self.ssl_port})
(xend-relocation-server-ssl-key-file '{key}')
(xend-relocation-server-ssl-cert-file '{cert}')
(relocd-relocation-ssl-ca-file '{pki.ca}')
"""
        super().__init__(root, name, address, extra_config=extra)
        self.next_env: dict[str, str] = {}

    def start(self, timeout: float = 30.0) -> None:
        self.env, self.next_env = self.next_env, {}
        super().start(timeout)


async def _start(*daemons: PointDaemon) -> None:
    await asyncio.gather(*(asyncio.to_thread(d.start) for d in daemons))


async def _call(d: DaemonProc, op: str, **args: Any) -> Any:
    return await asyncio.wait_for(d.call(op, **args), 30)


async def discover(root: Path, pki: Pki, *, memory_mib: int = 32, store: str | None = None) -> PointMap:
    """One clean migration (the cells' setup, no fault) with both daemons tracing their crash points."""
    root.mkdir(parents=True, exist_ok=True)
    trace = root / "trace.txt"
    a = PointDaemon(root, "hostA", "127.0.0.1", pki, store)
    b = PointDaemon(root, "hostB", "127.0.0.2", pki, store)
    try:
        for d in (a, b):
            d.next_env = {"RELOCD_FAULT_TRACE": str(trace)}
        await _start(a, b)
        created = await _call(a, "create", name=DOMAIN, memory=memory_mib, workload=WORKLOAD)
        await asyncio.sleep(0.3)
        result = await asyncio.wait_for(
            a.call("migrate", name=DOMAIN, host=b.address, port=b.port, live=True, verify=True), 60
        )
        if result["status"] != "completed":
            raise RuntimeError(f"the clean migration did not complete: {result}")
        problems, _ = await _settle(a, b, created["uuid"], time.monotonic() + 10)
        if problems:
            raise RuntimeError(f"the clean migration left: {'; '.join(problems)}")
        # The target closes its journal entry once DONE arrives, after the
        # source has returned: wait until the trace stops growing.
        size, quiet_since = -1, time.monotonic()
        while time.monotonic() - quiet_since < 1.0:
            now = trace.stat().st_size if trace.exists() else 0
            if now != size:
                size, quiet_since = now, time.monotonic()
            await asyncio.sleep(0.1)
    finally:
        a.cleanup()
        b.cleanup()
    points = parse_trace(trace.read_text())
    if not points:
        raise RuntimeError("the clean migration reached no crash point (is RELOCD_FAULT_TRACE read?)")
    return PointMap(points)


# -- one cell -----------------------------------------------------------------


@dataclasses.dataclass
class CrashOutcome:
    cell: Cell
    expected: str | None = None  # the host the trace says it must end on, if it decides
    status: str = "?"  # the migrate op's status, or "source killed"
    ended_on: str = "?"  # "source", "target" or "nowhere/twice"
    fired: str = ""  # what the fault did
    problems: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def missed(self) -> bool:
        """The point never came: the cell proves nothing either way."""
        return any(p.startswith("fault point not reached") for p in self.problems)

    def summary(self) -> str:
        head = f"{self.cell.id:<48} {self.status:<13} runs on {self.ended_on:<7}"
        tail = "ok" if self.ok else "FAIL: " + "; ".join(self.problems)
        return f"{head} {self.seconds:5.1f}s  [{self.fired}] {tail}"


async def _settle(a: DaemonProc, b: DaemonProc, uuid: str, deadline: float) -> tuple[list[str], DaemonProc | None]:
    while True:
        try:
            problems, host = await invariant_problems(a, b, uuid)
        except (RelocdError, OSError, TimeoutError) as exc:  # a daemon restarting: try again
            problems, host = [f"control call failed: {exc}"], None
        if not problems or time.monotonic() > deadline:
            return problems, host
        await asyncio.sleep(0.3)


class _HoldDesk:
    """The Unix socket held points report to: runs the fault while the daemon waits, then lets it go on."""

    def __init__(self, path: Path, act: Any) -> None:
        self.path = path
        self.act = act
        self.held: str | None = None
        self.event = asyncio.Event()
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> _HoldDesk:
        self._server = await asyncio.start_unix_server(self._serve, str(self.path))
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = (await reader.readline()).decode().strip()
            self.held = line
            await self.act()
            self.event.set()
            writer.write(b"go\n")
            await writer.drain()
        except (ConnectionError, OSError):
            self.event.set()  # the held daemon was the one killed
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()


async def _wait_until(cond: Any, migration: asyncio.Future[Any], timeout: float) -> bool:
    """True once cond() holds; False if the migration finished first without it (or timeout)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        if migration.done():
            await asyncio.sleep(0.3)  # a fault right at the end of the migration
            return bool(cond())
        await asyncio.sleep(0.05)
    return False


async def owner_problems(store: str, uuid: str, runner: DaemonProc) -> list[str]:
    """With a cluster store: the ownership record names the host the domain runs on, with no offer left."""
    from relocd.cluster.etcd import EtcdStore
    from relocd.cluster.ownership import OwnershipRecord, key_of

    entry = await EtcdStore(store).get(key_of(uuid))
    if entry is None:
        return ["no ownership record in the cluster store"]
    rec = OwnershipRecord.decode(entry.value)
    if rec.host != runner.name:
        return [f"the ownership record names {rec.host} ({rec.state}), the domain runs on {runner.name}"]
    return []


async def run_crash_cell(
    root: Path, cell: Cell, pki: Pki, points: PointMap | None = None, *, memory_mib: int = 32, migrate_again: bool = True,
    store: str | None = None,
) -> CrashOutcome:
    """Run one cell in fresh daemons under ``root``; never raises for a broken invariant."""
    out = CrashOutcome(cell, expected=points.expected_host(cell) if points is not None else None)
    t0 = time.monotonic()
    root.mkdir(parents=True, exist_ok=True)
    a = PointDaemon(root, "hostA", "127.0.0.1", pki, store)
    b = PointDaemon(root, "hostB", "127.0.0.2", pki, store)
    by_side = {"source": a, "target": b}
    at = by_side[cell.point.side]
    other = b if at is a else a
    killed: list[PointDaemon] = []
    proxy: FaultProxy | None = None
    desk: _HoldDesk | None = None
    self_kill = (cell.fault, cell.point.side) in ((KILL_SOURCE, "source"), (KILL_TARGET, "target"))

    async def act() -> None:
        """The fault, while ``at`` waits at the point."""
        if cell.fault == KILL_BOTH:
            victims = [at, other]
        elif cell.fault in (KILL_SOURCE, KILL_TARGET):
            victims = [a if cell.fault == KILL_SOURCE else b]
        else:
            victims = []
            assert proxy is not None
            n = await proxy.cut_now()
            out.fired = f"cut {n} link(s)"
        for v in victims:
            v.kill()  # SIGKILL, then reaped
            killed.append(v)
        if victims:
            out.fired = "SIGKILL " + ", then ".join(v.name for v in victims)

    try:
        trace = root / "trace.txt"
        action = "kill" if self_kill else "hold"
        at.next_env = {"RELOCD_FAULT": f"{cell.point}:{action}", "RELOCD_FAULT_TRACE": str(trace)}
        if not self_kill:
            desk = await _HoldDesk(root / "hold.sock", act).start()
            at.next_env["RELOCD_FAULT_HOLD"] = str(desk.path)
        await _start(a, b)
        created = await _call(a, "create", name=DOMAIN, memory=memory_mib, workload=WORKLOAD)
        uuid = created["uuid"]
        args: dict[str, Any] = {"host": b.address, "port": b.port}
        if cell.fault in (CUT_PLAIN, CUT_TLS):
            tls = cell.fault == CUT_TLS
            upstream = (b.address, b.ssl_port if tls else b.port)
            # listens on B's address, so B's certificate names what the source dials
            proxy = await FaultProxy(b.address, upstream, None, raw=tls).start()
            args = {"host": b.address, "port": proxy.port, "ssl": tls}
        await asyncio.sleep(0.3)  # let the workload dirty some pages
        migration = asyncio.ensure_future(a.call("migrate", name=DOMAIN, live=True, verify=True, **args))
        if self_kill:
            fired = await _wait_until(lambda: not at.alive, migration, 30)
            if fired:
                killed.append(at)
                last = [p for p in parse_trace(trace.read_text()) if p.side == cell.point.side] if trace.exists() else []
                out.fired = f"{at.name} killed itself" + ("" if last and last[-1] == cell.point else " (elsewhere?)")
        else:
            assert desk is not None
            fired = await _wait_until(desk.event.is_set, migration, 30)
        if not fired:
            out.fired = "not reached"
            out.problems.append("fault point not reached")
        await _start(*[d for d in killed if not d.alive])
        try:
            result = await asyncio.wait_for(migration, SETTLE_S)
            out.status = result["status"]
        except TimeoutError:
            out.status = "hung"
            out.problems.append(f"migrate did not return within {SETTLE_S:g} s")
        except (RelocdError, OSError) as exc:
            source_killed = a in killed
            out.status = "source killed" if source_killed else "error"
            if not source_killed:
                out.problems.append(f"migrate op failed: {exc}")
        problems, runner = await _settle(a, b, uuid, time.monotonic() + SETTLE_S)
        out.problems += problems
        out.ended_on = "source" if runner is a else "target" if runner is b else "nowhere/twice"
        if runner is not None and out.expected is not None and out.ended_on != out.expected:
            out.problems.append(f"ended on the {out.ended_on}, but the trace says it must end on the {out.expected}")
        if runner is not None and store is not None:
            out.problems += await owner_problems(store, uuid, runner)
        if runner is not None:
            check = await _call(runner, "check", name=DOMAIN)
            if not check["ok"]:
                out.problems.append(f"memory does not verify: {check['problem']}")
            if migrate_again and not out.problems:
                dest = b if runner is a else a
                again = await asyncio.wait_for(
                    runner.call("migrate", name=DOMAIN, host=dest.address, port=dest.port, live=True), 60
                )
                if again["status"] != "completed":
                    out.problems.append(f"cannot migrate it again: {again['error']}")
                else:
                    check = await _call(dest, "check", name=DOMAIN)
                    if not check["ok"]:
                        out.problems.append(f"memory does not verify after migrating again: {check['problem']}")
    except (RelocdError, OSError, RuntimeError, TimeoutError) as exc:
        out.problems.append(f"harness: {type(exc).__name__}: {exc}")
    finally:
        if proxy is not None:
            await proxy.close()
        if desk is not None:
            await desk.close()
        a.cleanup()
        b.cleanup()
    out.seconds = round(time.monotonic() - t0, 1)
    return out
