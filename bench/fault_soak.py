"""Run the whole fault matrix again and again; count lost and duplicated domains.

Not for CI: each pass is 45 cells (5 faults x 9 phases) of real daemons, a few
seconds each.  Every cell injects one fault into a live migration and then
checks the invariant of ``tests/faults/cells.py`` (runs on exactly one host,
memory verifies, nothing half-built left, it migrates again).  The figure the
issue asks for: zero lost or duplicated domains over at least 200 injected
faults.

    python bench/fault_soak.py --minutes 20            # until the time is up
    python bench/fault_soak.py --faults 225 --json     # exactly five passes
    python bench/fault_soak.py --only stall,cut --phases go,resumed
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "faults"))

from cells import FAULTS, CellOutcome, run_cell

from relocd.engine.faults import PHASES


def classify(outcome: CellOutcome) -> str:
    """lost (runs nowhere), duplicated (runs twice), other (e.g. something half-built), missed, or ok."""
    text = " ".join(outcome.problems)
    if "not killed at its fault point" in text or "never saw its trigger" in text:
        return "missed"  # the fault was not injected: the cell proves nothing either way
    if "running on 0 hosts" in text:
        return "lost"
    if "running on 2 hosts" in text:
        return "duplicated"
    return "other" if outcome.problems else "ok"


async def soak(args: argparse.Namespace) -> dict[str, object]:
    faults = [f for f in FAULTS if not args.only or f in args.only.split(",")]
    phases = [p for p in PHASES if not args.phases or p in args.phases.split(",")]
    cells = [(f, p) for f in faults for p in phases]
    end = time.monotonic() + args.minutes * 60
    counts: Counter[str] = Counter()
    failures: list[str] = []
    by_cell: dict[str, Counter[str]] = {}
    injected = 0
    root = Path(tempfile.mkdtemp(prefix="relocd-soak-"))
    try:
        passes = 0
        while injected < args.faults and time.monotonic() < end:
            passes += 1
            for fault, phase in cells:
                if injected >= args.faults or time.monotonic() >= end:
                    break
                cell_root = root / f"{passes}-{fault}-{phase}"
                outcome = await run_cell(cell_root, fault, phase, migrate_again=not args.no_migrate_again)
                kind = classify(outcome)
                injected += kind != "missed"
                counts[kind] += 1
                by_cell.setdefault(f"{fault}@{phase}", Counter())[f"{outcome.status}->{outcome.ended_on}"] += 1
                if kind != "ok":
                    failures.append(outcome.summary())
                    if args.keep_failures:
                        continue  # keep the daemons' logs for a post-mortem
                shutil.rmtree(cell_root, ignore_errors=True)
                if args.verbose:
                    print(outcome.summary(), flush=True)
    finally:
        if not args.keep_failures:
            shutil.rmtree(root, ignore_errors=True)
    return {
        "injected_faults": injected,
        "passes": passes,
        "lost": counts["lost"],
        "duplicated": counts["duplicated"],
        "other_violations": counts["other"],
        "missed": counts["missed"],
        "ok": counts["ok"],
        "failures": failures,
        "outcomes": {cell: dict(c) for cell, c in sorted(by_cell.items())},
        "logs": str(root) if args.keep_failures else None,
    }


_SHORT = {"completed": "moved", "rolled-back": "rolled back", "failed": "refused",
          "source killed": "source died"}  # fmt: skip


def markdown(report: dict[str, object]) -> str:
    """The matrix as docs/faults.md shows it: phases down, faults across."""
    outcomes: dict[str, dict[str, int]] = report["outcomes"]  # type: ignore[assignment]
    lines = ["| phase | " + " | ".join(FAULTS) + " |", "|---" * (len(FAULTS) + 1) + "|"]
    for phase in PHASES:
        row = []
        for fault in FAULTS:
            seen = outcomes.get(f"{fault}@{phase}", {})
            parts = []
            for key, n in sorted(seen.items(), key=lambda kv: -kv[1]):
                status, _, host = key.partition("->")
                parts.append(f"{_SHORT.get(status, status)} → {host}" + (f" ×{n}" if len(seen) > 1 else ""))
            row.append("<br>".join(parts) or "–")
        lines.append(f"| {phase} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30.0, help="stop after this long (default 30)")
    ap.add_argument("--faults", type=int, default=10**9, help="stop after this many injected faults")
    ap.add_argument("--only", default="", help=f"comma-separated faults out of {','.join(FAULTS)}")
    ap.add_argument("--phases", default="", help="comma-separated phases")
    ap.add_argument("--no-migrate-again", action="store_true", help="skip the follow-up migration of each cell")
    ap.add_argument("--keep-failures", action="store_true", help="keep failed cells' daemon logs")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--markdown", action="store_true", help="also print the matrix as a markdown table")
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per cell")
    args = ap.parse_args()
    t0 = time.monotonic()
    report = asyncio.run(soak(args))
    report["minutes"] = round((time.monotonic() - t0) / 60, 1)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"{report['injected_faults']} faults injected in {report['minutes']} min "
            f"({report['passes']} passes): {report['lost']} lost, {report['duplicated']} duplicated, "
            f"{report['other_violations']} other invariant violations"
        )
        failures: list[str] = report["failures"]  # type: ignore[assignment]
        for line in failures:
            print("  " + line)
    if args.markdown:
        print(markdown(report))
    return 0 if report["lost"] == report["duplicated"] == report["other_violations"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
