"""Every crash point x every fault kind: the enumerated fault matrix, in full (not for CI).

First one clean migration with both daemons tracing their crash points
(``tests/faults/crashpoints.py``: about 80 points), then one cell per point
and fault kind (kill-source, kill-target, kill-both, cut-plain, cut-tls), each
in fresh daemons, checking the invariant of ``tests/faults/cells.py``.  About
six seconds a cell on a busy 2-core machine, so the whole set takes about
45 minutes.  Prints one line per cell as it goes, then a table and a summary
ready to paste into docs/faults.md.

    python bench/fault_points.py                       # every cell
    python bench/fault_points.py --faults cut-tls      # one fault kind
    python bench/fault_points.py --points journal:go-sent --limit 10
    python bench/fault_points.py --cells 'kill-both@target:journal:resuming:done'
    python bench/fault_points.py --store               # with a cluster store: a single-node etcd started here
    python bench/fault_points.py --store etcd://h:2379 # ... or this one
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "faults"))
sys.path.insert(0, str(HERE.parent / "tests" / "daemon"))
sys.path.insert(0, str(HERE.parent))

from crashpoints import FAULT_KINDS, Cell, CrashOutcome, Pki, cells_of, discover, run_crash_cell

_SHORT = {"completed": "moved", "rolled-back": "rolled back", "failed": "refused",
          "source killed": "source died"}  # fmt: skip


def verdict(o: CrashOutcome) -> str:
    if o.missed:
        return "missed"
    return "ok" if o.ok else "FAIL"


def table(points: list[str], outcomes: dict[str, CrashOutcome], faults: list[str]) -> str:
    """Points down, fault kinds across: what migrate said -> where the domain runs (FAIL marked)."""
    lines = ["| point | " + " | ".join(faults) + " |", "|---" * (len(faults) + 1) + "|"]
    for point in points:
        row = []
        for fault in faults:
            o = outcomes.get(f"{fault}@{point}")
            if o is None:
                row.append("–")
                continue
            text = f"{_SHORT.get(o.status, o.status)} → {o.ended_on}"
            row.append(text if o.ok else f"**{verdict(o)}** {text}")
        lines.append(f"| `{point}` | " + " | ".join(row) + " |")
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> int:
    root = Path(tempfile.mkdtemp(prefix="relocd-points-"))
    t0 = time.monotonic()
    etcd = None
    try:
        store = args.store or None
        if store == "start":
            from tests.system.etcdlab import EtcdCluster, etcd_missing

            missing = etcd_missing()
            if missing:
                print(f"--store: {missing}", file=sys.stderr)
                return 2
            (root / "etcd").mkdir(parents=True)
            etcd = EtcdCluster(root / "etcd", members=1)
            etcd.start()
            store = etcd.url
        if store:
            print(f"with the cluster store {store}", flush=True)
        pki = Pki.make(root / "pki")
        pmap = await discover(root / "discover", pki, store=store)
        points = pmap.points
        faults = [f for f in FAULT_KINDS if not args.faults or f in args.faults.split(",")]
        if args.cells:
            cells = [Cell.parse(c) for c in args.cells.split(",")]
        else:
            cells = cells_of(points, faults)
            if args.points:
                cells = [c for c in cells if any(s in str(c.point) for s in args.points.split(","))]
        if args.limit:
            cells = cells[: args.limit]
        print(f"{len(points)} crash points, {len(cells_of(points))} cells in all; running {len(cells)}", flush=True)
        runs: list[CrashOutcome] = []  # a cell named twice in --cells runs twice
        for i, cell in enumerate(cells, 1):
            cell_root = root / f"{i:03d}"
            o = await run_crash_cell(cell_root, cell, pki, pmap, migrate_again=not args.no_migrate_again, store=store)
            runs.append(o)
            print(f"[{i}/{len(cells)}] {o.summary()}", flush=True)
            if o.ok or not args.keep_failures:
                shutil.rmtree(cell_root, ignore_errors=True)
        minutes = (time.monotonic() - t0) / 60
        outcomes = {o.cell.id: o for o in runs}  # the table shows a cell's last run
        counts = {k: sum(verdict(o) == k for o in runs) for k in ("ok", "FAIL", "missed")}
        per_cell = sum(o.seconds for o in runs) / max(1, len(runs))
        print()
        if args.markdown:
            print(table([str(p) for p in points], outcomes, faults))
            print()
        print(
            f"{len(points)} points, {len(runs)} cells: {counts['ok']} ok, {counts['FAIL']} failed, "
            f"{counts['missed']} missed (point not reached); {minutes:.1f} min, {per_cell:.1f} s a cell"
        )
        for o in runs:
            if not o.ok:
                print("  " + o.summary())
        if args.json:
            report = {
                "points": [str(p) for p in points],
                "cells": len(runs),
                **counts,
                "minutes": round(minutes, 1),
                "outcomes": [{"cell": o.cell.id, **dataclass_json(o)} for o in runs],
            }
            Path(args.json).write_text(json.dumps(report, indent=2))
        return 0 if counts["FAIL"] == 0 else 1
    finally:
        if etcd is not None:
            etcd.stop()
        if not args.keep_failures:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"logs kept under {root}")


def dataclass_json(o: CrashOutcome) -> dict[str, object]:
    return {"status": o.status, "ended_on": o.ended_on, "expected": o.expected, "fired": o.fired,
            "problems": o.problems, "seconds": o.seconds}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faults", default="", help=f"comma-separated fault kinds out of {','.join(FAULT_KINDS)}")
    ap.add_argument("--points", default="", help="only points whose SIDE:NAME contains one of these (comma-separated)")
    ap.add_argument("--cells", default="", help="exactly these cells, FAULT@SIDE:NAME (comma-separated)")
    ap.add_argument("--limit", type=int, default=0, help="at most this many cells")
    ap.add_argument("--no-migrate-again", action="store_true", help="skip each cell's follow-up migration")
    ap.add_argument("--keep-failures", action="store_true", help="keep failed cells' daemon logs")
    ap.add_argument("--markdown", action="store_true", help="print the table of cells (docs/faults.md)")
    ap.add_argument("--json", default="", help="also write the report to this file")
    ap.add_argument("--store", nargs="?", const="start", default="",
                    help="both daemons arbitrate by a cluster store: this etcd URL, or (no URL) a single-node "
                         "etcd started for the run")
    args = ap.parse_args()
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
