"""The crash-point cells with a cluster store: a real single-node etcd, started here.

The same cells as ``test_crash_points.py`` (crashpoints.py), both daemons
arbitrating by the store: the trace finds the ``store:*`` points as well,
and each cell checks the same invariant (the domain runs on exactly one
host, nothing half-built, its memory verifies, it migrates again) and that
the ownership record names that host.  CI runs a rotating sample of
CI_STORE_SAMPLE cells (RELOCD_CRASH_TURN, RELOCD_CRASH_CELLS and
RELOCD_CRASH_ALL=1 as there); ``bench/fault_points.py --store`` runs all.
Skips, with the reason, where etcd is not installed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from crashpoints import Cell, Pki, cells_of, discover, rotation, run_crash_cell, todays_turn

from tests.system.etcdlab import EtcdCluster, etcd_missing

pytestmark = pytest.mark.skipif(etcd_missing() is not None, reason=etcd_missing() or "")

#: cells a CI run takes (a different slice each day), on top of test_crash_points.py's
CI_STORE_SAMPLE = 3


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    one = EtcdCluster(tmp_path_factory.mktemp("etcd"), members=1)
    one.start()
    try:
        yield one
    finally:
        one.stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    pytest.importorskip("cryptography")
    return Pki.make(tmp_path_factory.mktemp("pki"))


async def test_crash_point_cells_with_the_store(tmp_path: Path, pki: Pki, etcd: EtcdCluster) -> None:
    points = await discover(tmp_path / "discover", pki, store=etcd.url)
    names = {str(p) for p in points.points}
    for expected in ("source:store:offer", "source:store:offer:done", "target:store:claim", "target:store:claim:done"):
        assert expected in names, f"{expected} not reached by the clean migration with a store: {sorted(names)}"
    # a store point comes between the source's offer and its GO, and the target's claim before its resume
    order = [str(p) for p in points.points]
    assert order.index("source:store:offer:done") < order.index("source:journal:go-sent")
    assert order.index("target:store:claim:done") < order.index("target:journal:starting")
    cells = cells_of(points.points)
    named = os.environ.get("RELOCD_CRASH_CELLS", "")
    if named:
        chosen = [Cell.parse(c) for c in named.split(",")]
    elif os.environ.get("RELOCD_CRASH_ALL") == "1":
        chosen = cells
    else:
        # the sample is drawn from the cells around the store's writes, where the store decides
        near = [c for c in cells if "store:" in c.point.name or "go" in c.point.name.lower()]
        chosen = rotation(near, CI_STORE_SAMPLE, todays_turn())
    print(f"\n{len(points.points)} crash points with a store, {len(cells)} cells; running {len(chosen)}:")
    outcomes = []
    for i, cell in enumerate(chosen):
        outcome = await run_crash_cell(tmp_path / f"{i:03d}", cell, pki, points, store=etcd.url)
        print(outcome.summary())
        outcomes.append(outcome)
    failed = [o for o in outcomes if not o.ok]
    assert not failed, "\n".join(
        [o.summary() for o in failed] + [f"reproduce: RELOCD_CRASH_CELLS='{','.join(o.cell.id for o in failed)}'"]
    )
