#!/usr/bin/env python3
"""How many page channels: relocd non-live migrations over 1, 2, 4 ... channels, interleaved (issue 13).

Each repeat runs raw loopback TCP and one relocd non-live migration per
channel count, in rotating order, between two daemons on loopback (sim
domain of non-zero pages, fresh target each run).  It prints the streaming
phase (pause to commit) and the whole operation for each count, and each
over raw TCP: the figures ``relocd-migration-channels``'s default was chosen
by (docs/memory.md).  A script, not a test.

Usage: python bench/bench_channels.py [--memory MIB] [--repeat N] [--channels 1,2,4] [--ssl]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "daemon"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_vs_qemu import RunFailed, relocd_migration, relocd_revision  # noqa: E402
from harness import DaemonProc  # noqa: E402
from rawtcp import raw_loopback_transfer  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--memory", type=int, default=1024, help="guest size in MiB (default 1024)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--channels", default="1,2,4", help="comma-separated channel counts")
    ap.add_argument("--live", action="store_true", help="live, hotset:size=64MiB,rate=100MB/s (default: non-live)")
    args = ap.parse_args()
    counts = [int(c) for c in args.channels.split(",")]
    nbytes = args.memory << 20
    revision = relocd_revision()
    runs: dict[str, list[dict[str, Any]]] = {"raw": [], **{f"ch{c}": [] for c in counts}}
    workload = "hotset:size=64MiB,rate=100MB/s" if args.live else "idle:fill=stamped"
    with tempfile.TemporaryDirectory(prefix="relocd-channels-") as tmp:
        slack = "(relocd-idle-timeout 60)\n(relocd-handshake-timeout 30)"
        a = DaemonProc(Path(tmp), "A", "127.0.0.1", extra_config=slack)
        b = DaemonProc(Path(tmp), "B", "127.0.0.2", extra_config=slack)
        try:
            a.start()
            b.start()
            steps: list[tuple[str, Any]] = [("raw", lambda: {"wall_s": raw_loopback_transfer(nbytes)})]
            for c in counts:
                steps.append((f"ch{c}", lambda c=c: asyncio.run(
                    relocd_migration(a, b, args.memory, workload, args.live, {"channels": c}))))
            for i in range(args.repeat):
                k = i % len(steps)
                for name, fn in steps[k:] + steps[:k]:
                    try:
                        r = fn()
                    except RunFailed as e:
                        print(f"run {i + 1} {name}: FAILED: {e}", file=sys.stderr)
                        continue
                    runs[name].append(r)
                    print(f"run {i + 1} {name}: " + ", ".join(
                        f"{k2} {r[k2]:.3f}" for k2 in ("wall_s", "total_s", "stream_s", "downtime_ms") if r.get(k2) is not None),
                        file=sys.stderr, flush=True)
        finally:
            a.stop()
            b.stop()
            a.cleanup()
            b.cleanup()

    def med(name: str, key: str) -> float | None:
        vals = [float(r[key]) for r in runs[name] if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    raw = med("raw", "wall_s")
    print(f"{args.memory} MiB guest, {'live' if args.live else 'non-live'}, median of {args.repeat} interleaved runs, "
          f"{os.cpu_count()} cpus, loopback; relocd {revision}")
    print(f"  raw loopback TCP                      {raw:.2f} s" if raw else "  raw: —")
    for c in counts:
        total, stream, down = med(f"ch{c}", "total_s"), med(f"ch{c}", "stream_s"), med(f"ch{c}", "downtime_ms")
        if total is None or stream is None:
            print(f"  {c} channel(s): no run completed")
            continue
        line = f"  {c:>2} channel(s): total {total:.2f} s, streaming {stream:.2f} s"
        if raw:
            line += f", streaming vs raw TCP {raw / stream:.2f}x"
        if args.live and down is not None:
            line += f", downtime {down:.1f} ms"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
