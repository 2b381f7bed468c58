"""Test-only fault injection points: a daemon can be told to die or stall at a phase.

Production code calls ``await fault_point(side, phase)`` at each phase boundary
of a migration.  Unless the environment variable ``RELOCD_FAULT`` is set (only
the fault-matrix tests set it) this returns at once.  ``RELOCD_FAULT`` holds
``SIDE:PHASE:ACTION`` (e.g. ``target:prepared:kill``):

* ``kill``  -- SIGKILL this daemon on the spot (a crash at the worst moment);
* ``stall`` -- stop making progress (sleep for an hour) as a hung peer would;

Phases: hello, reserve, config, precopy-1, precopy-2, stop-and-copy,
prepared, go, resumed (see docs/faults.md for what each point means).
"""

from __future__ import annotations

import asyncio
import os
import signal

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

_SPEC = os.environ.get("RELOCD_FAULT", "")


def _parse(spec: str) -> tuple[str, str, str] | None:
    parts = spec.split(":")
    if len(parts) != 3:
        return None
    return parts[0], parts[1], parts[2]


_FAULT = _parse(_SPEC)


async def fault_point(side: str, phase: str) -> None:
    """Inject the configured fault if this is its point; otherwise nothing."""
    if _FAULT is None or _FAULT[0] != side or _FAULT[1] != phase:
        return
    action = _FAULT[2]
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "stall":
        await asyncio.sleep(3600)
