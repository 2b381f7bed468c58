"""The fault matrix: every phase of a live migration x every fault; nothing is lost.

Each cell (its own test id, ``test_cell[FAULT@PHASE]``) starts two fresh
daemons, migrates a small sim domain under a hotset workload, injects the
fault, lets the daemons recover (a killed daemon is restarted; after GO the
source asks the target) and checks the invariant of ``cells.py``: the domain
runs on exactly one host, its memory verifies, no half-built domain,
reservation or migration is left, and it can migrate again.

Every cell applies: each phase has a record on the wire (for the proxy) and a
fault point on both sides (for the kills).  docs/faults.md has the table.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cells import FAULTS, run_cell

from relocd.engine.faults import PHASES

CELLS = [pytest.param(f, p, id=f"{f}@{p}") for f in FAULTS for p in PHASES]


@pytest.mark.parametrize(("fault", "phase"), CELLS)
async def test_cell(tmp_path: Path, fault: str, phase: str) -> None:
    outcome = await run_cell(tmp_path, fault, phase)
    print(outcome.summary())
    assert outcome.ok, outcome.summary()
    if phase in ("go", "resumed"):
        # Past GO the target holds the only copy that may run: recovery must
        # finish the move, never roll it back.
        assert outcome.ended_on == "target", outcome.summary()
    if phase in ("hello", "reserve", "config", "precopy-1", "precopy-2", "stop-and-copy"):
        assert outcome.ended_on == "source", outcome.summary()
