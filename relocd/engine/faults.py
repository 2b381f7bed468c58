"""Test-only fault injection: a daemon can be told to die, stall or wait at a point.

Two kinds of point, both free unless the environment asks for them (only the
fault tests do):

* phases: ``await fault_point(side, phase)`` at each phase boundary of a
  migration, placed by hand (the fault matrix of ``tests/faults``);
* crash points: ``crash_point(side, name)``, synchronous (the journal is), on
  both sides of every durable fact and every record, so a harness can find
  them all by tracing one clean migration (``tests/faults/crashpoints.py``).

``RELOCD_FAULT=SIDE:POINT:ACTION`` picks one point (a phase, or a crash
point's name, which may itself hold colons: the action is the last field),
e.g. ``target:prepared:kill`` or ``source:journal:go-sent:done:kill``:

* ``kill``  -- SIGKILL this daemon on the spot (a crash at the worst moment);
* ``stall`` -- stop making progress for an hour, as a hung peer would (a crash
  point blocks its thread: the whole event loop when it is called from it);
* ``hold``  -- crash points only: tell the harness listening on the Unix socket
  ``RELOCD_FAULT_HOLD`` (one line, ``SIDE NAME PID``) and wait for its answer,
  while it kills a daemon or cuts the link: a fault from outside, at this
  exact point.  Fires once; a harness that is gone counts as an answer.

``RELOCD_FAULT_TRACE=FILE`` appends ``SIDE NAME`` for every crash point
reached, one line each, with one unbuffered O_APPEND write, so two daemons
may share a file and a SIGKILL loses no line.

Crash point names (stable from run to run; docs/faults.md lists them):

* ``journal:begin``, ``journal:PHASE``, ``journal:finish:OUTCOME``: before a
  journal write, and the same with ``:done`` once it is on disk (the side is
  the entry's role);
* ``send:TYPE`` (checked and encoded, before the write), ``send:TYPE:done``
  (the transport took it) and ``recv:TYPE`` (parsed and checked, before the
  engine acts on it); the side is the conversation's role, a QUERY
  connection counting as the source.  Savefile streams have none.

Records that repeat are points only a bounded number of times: PAGES and
STREAM as ``TYPE@1`` and ``TYPE@2`` (the first record of precopy rounds 1 and
2) and ``TYPE@stop`` (the first of stop-and-copy), END_ROUND as
``END_ROUND@1`` and ``END_ROUND@2``.  Later rounds have no points: how many
there are depends on the guest's dirty rate, so their names would not be
stable.  Any other record is a point the first time it passes a connection.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

from relocd.protocol.codes import RecordType, Role
from relocd.protocol.state import Conversation

PHASES = (
    "hello",
    "reserve",
    "config",
    "precopy-1",
    "precopy-2",
    "stop-and-copy",
    "prepared",
    "go",
    "resumed",
)

ACTIONS = ("kill", "stall", "hold")

#: How long a held point waits for the harness before going on regardless.
HOLD_TIMEOUT_S = 30.0
#: Precopy rounds whose PAGES, STREAM and END_ROUND records are crash points.
ROUNDS_NAMED = 2
_REPEATING = (RecordType.PAGES, RecordType.STREAM)


@dataclass(frozen=True)
class Fault:
    side: str
    point: str
    action: str


def parse_fault(spec: str) -> Fault | None:
    """``SIDE:POINT:ACTION`` (POINT may hold colons), or None if it is not one."""
    parts = spec.split(":")
    if len(parts) < 3 or parts[-1] not in ACTIONS:
        return None
    return Fault(parts[0], ":".join(parts[1:-1]), parts[-1])


_FAULT = parse_fault(os.environ.get("RELOCD_FAULT", ""))


async def fault_point(side: str, phase: str) -> None:
    """Inject the configured fault if this is its point; otherwise nothing."""
    if _FAULT is None or _FAULT.side != side or _FAULT.point != phase:
        return
    if _FAULT.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif _FAULT.action == "stall":
        await asyncio.sleep(3600)


class PointWatch:
    """What this process does at crash points: its one fault, and the trace."""

    def __init__(self, fault: Fault | None, trace: str | None = None, hold: str | None = None) -> None:
        self.fault = fault
        self.trace = trace
        self.hold = hold
        self._trace_fd: int | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> PointWatch | None:
        """None (every crash point free) unless a crash point's fault or a trace is asked for."""
        fault = parse_fault(env.get("RELOCD_FAULT", ""))
        if fault is not None and fault.point in PHASES:
            fault = None  # a phase's fault: fault_point() injects it
        trace = env.get("RELOCD_FAULT_TRACE") or None
        if fault is None and trace is None:
            return None
        return cls(fault, trace, env.get("RELOCD_FAULT_HOLD") or None)

    def reach(self, side: str, name: str) -> None:
        if self.trace is not None:
            self._append(f"{side} {name}\n".encode())
        fault = self.fault
        if fault is None or fault.side != side or fault.point != name:
            return
        self.fault = None  # once
        if fault.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif fault.action == "stall":
            time.sleep(3600)
        elif fault.action == "hold":
            self._hold(side, name)

    def _append(self, line: bytes) -> None:
        with self._lock:
            if self._trace_fd is None:
                assert self.trace is not None
                self._trace_fd = os.open(self.trace, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.write(self._trace_fd, line)

    def _hold(self, side: str, name: str) -> None:
        if self.hold is None:
            return
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(HOLD_TIMEOUT_S)
            try:
                s.connect(self.hold)
                s.sendall(f"{side} {name} {os.getpid()}\n".encode())
                s.recv(64)
            except OSError:
                pass  # no harness (or it hung up): go on as if it had answered


#: None unless RELOCD_FAULT names a crash point or RELOCD_FAULT_TRACE is set:
#: callers on busy paths test this before building a point's name.
WATCH = PointWatch.from_env(os.environ)


def crash_point(side: str, name: str) -> None:
    """Trace this point and inject the configured fault if it is this one; otherwise nothing."""
    if WATCH is not None:
        WATCH.reach(side, name)


class RecordPoints:
    """The crash points of one connection's records: names them, reaches them."""

    def __init__(self, watch: PointWatch, side: str) -> None:
        self.watch = watch
        self.side = side
        self._round = 1
        self._stopped = False
        self._seen: set[str] = set()
        self._sending: str | None = None  # the send point whose ``:done`` comes next

    def _name(self, direction: str, rtype: RecordType) -> str | None:
        label: str | None = ""
        if rtype in _REPEATING:
            label = "stop" if self._stopped else str(self._round) if self._round <= ROUNDS_NAMED else None
        elif rtype is RecordType.END_ROUND:
            label = str(self._round) if self._round <= ROUNDS_NAMED else None
            self._round += 1
        elif rtype is RecordType.STOP:
            self._stopped = True
        if label is None:
            return None
        name = f"{direction}:{rtype.name}@{label}" if label else f"{direction}:{rtype.name}"
        if name in self._seen:
            return None
        self._seen.add(name)
        return name

    def sending(self, rtype: RecordType) -> None:
        """A checked record is about to be written."""
        self._sending = self._name("send", rtype)
        if self._sending is not None:
            self.watch.reach(self.side, self._sending)

    def sent(self) -> None:
        """The transport took the record ``sending`` announced."""
        if self._sending is not None:
            name, self._sending = self._sending, None
            self.watch.reach(self.side, f"{name}:done")

    def received(self, rtype: RecordType) -> None:
        """A record was parsed and checked; the engine has not seen it yet."""
        name = self._name("recv", rtype)
        if name is not None:
            self.watch.reach(self.side, name)


def record_points(conversation: Conversation) -> RecordPoints | None:
    """A connection's record points, or None (nothing to do per record) when none is watched."""
    if WATCH is None or conversation.savefile:
        return None
    return RecordPoints(WATCH, "target" if conversation.our_role is Role.TARGET else "source")
