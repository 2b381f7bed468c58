"""Every crash point the daemons reach, found by tracing, faulted in turn (crashpoints.py).

CI runs a rotating sample: CI_SAMPLE cells, a different slice of a fixed
shuffle each day, so that every cell comes round within a few weeks of
daily runs (RELOCD_CRASH_TURN=N picks a slice).  RELOCD_CRASH_ALL=1 runs
them all (about an hour: ``bench/fault_points.py`` does the same with a
table); RELOCD_CRASH_CELLS='FAULT@SIDE:NAME,...' runs exactly those, to
reproduce a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from crashpoints import (
    CI_SAMPLE,
    CUT_PLAIN,
    KILL_BOTH,
    KILL_SOURCE,
    KILL_TARGET,
    Cell,
    Pki,
    Point,
    PointMap,
    cells_of,
    discover,
    parse_trace,
    rotation,
    run_crash_cell,
    todays_turn,
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    pytest.importorskip("cryptography")
    return Pki.make(tmp_path_factory.mktemp("pki"))


def _chosen(cells: list[Cell]) -> tuple[list[Cell], str]:
    named = os.environ.get("RELOCD_CRASH_CELLS", "")
    if named:
        return [Cell.parse(c) for c in named.split(",")], "RELOCD_CRASH_CELLS"
    if os.environ.get("RELOCD_CRASH_ALL") == "1":
        return cells, "RELOCD_CRASH_ALL=1"
    turn = todays_turn()
    return rotation(cells, CI_SAMPLE, turn), f"rotation turn {turn} (RELOCD_CRASH_TURN={turn} repeats it)"


async def test_crash_point_cells(tmp_path: Path, pki: Pki) -> None:
    points = await discover(tmp_path / "discover", pki)
    names = {str(p) for p in points.points}
    # the durable facts and the records around the handoff were all found
    for expected in (
        "source:journal:begin", "source:journal:go-sent", "source:journal:go-sent:done",
        "source:send:GO", "source:send:GO:done", "target:recv:GO", "target:journal:resumed:done",
        "source:send:PAGES@1", "source:send:PAGES@2", "target:recv:END_ROUND@2",
        "source:journal:finish:completed:done", "target:journal:finish:completed",
    ):  # fmt: skip
        assert expected in names, f"{expected} not reached by the clean migration: {sorted(names)}"
    assert len(points.points) < 150, "the repeating records must stay bounded"
    cells = cells_of(points.points)
    chosen, why = _chosen(cells)
    print(f"\n{len(points.points)} crash points, {len(cells)} cells; running {len(chosen)} ({why}):")
    for cell in chosen:
        print(f"  {cell.id}")
    outcomes = []
    for i, cell in enumerate(chosen):
        outcome = await run_crash_cell(tmp_path / f"{i:03d}", cell, pki, points)
        print(outcome.summary())
        outcomes.append(outcome)
    failed = [o for o in outcomes if not o.ok]
    assert not failed, "\n".join(
        [o.summary() for o in failed] + [f"reproduce: RELOCD_CRASH_CELLS='{','.join(o.cell.id for o in failed)}'"]
    )


def test_the_trace_decides_the_direction_around_the_handoff() -> None:
    """A fault that stops the decision leaves the domain on the source; one after the resume, on the target."""
    trace = "\n".join(
        [
            "source send:COMMIT", "target recv:COMMIT", "target journal:prepared:done",
            "target send:PREPARED", "target send:PREPARED:done", "source send:COMMIT:done",
            "source recv:PREPARED", "source journal:go-sent", "source journal:go-sent:done",
            "source send:GO", "target recv:GO", "source send:GO:done",
            "target journal:resumed", "target journal:resumed:done", "target send:RESUMED",
            "source recv:RESUMED", "source recv:RESUMED", "bogus line",
        ]
    )  # fmt: skip
    points = parse_trace(trace)
    assert len(points) == 16 and points[0] == Point("source", "send:COMMIT")
    pm = PointMap(points)

    def expect(fault: str, point: str) -> str | None:
        return pm.expected_host(Cell(fault, Point.parse(point)))

    # before the decision, anything that stops the source stops the move
    assert expect(KILL_SOURCE, "source:journal:go-sent") == "source"
    assert expect(KILL_SOURCE, "source:journal:go-sent:done") is None
    # a cut before PREPARED is written: the source never hears it
    assert expect(CUT_PLAIN, "target:send:PREPARED") == "source"
    assert expect(CUT_PLAIN, "target:send:PREPARED:done") is None  # it may be through already
    # the target dies before PREPARED: no decision; after it, the source may decide alone
    assert expect(KILL_TARGET, "target:journal:prepared:done") == "source"
    assert expect(KILL_TARGET, "source:send:COMMIT:done") is None
    assert expect(KILL_BOTH, "source:recv:PREPARED") == "source"
    # once the target's resume is on disk, it must end there whatever happens
    for fault in (KILL_SOURCE, KILL_TARGET, KILL_BOTH, CUT_PLAIN):
        assert expect(fault, "target:journal:resumed:done") == "target"
        assert expect(fault, "source:recv:RESUMED") == "target"
    assert expect(KILL_TARGET, "target:journal:resumed") is None


def test_the_rotation_covers_every_cell() -> None:
    cells = cells_of([Point("source", f"p{i}") for i in range(13)])
    seen: set[str] = set()
    turns = -(-len(cells) // CI_SAMPLE)
    for turn in range(1000, 1000 + turns):
        sample = rotation(cells, CI_SAMPLE, turn)
        assert len(sample) == CI_SAMPLE and len({c.id for c in sample}) == CI_SAMPLE
        seen |= {c.id for c in sample}
    assert seen == {c.id for c in cells}
    assert rotation(cells, CI_SAMPLE, 7) == rotation(cells, CI_SAMPLE, 7)
