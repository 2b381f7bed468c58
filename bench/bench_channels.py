#!/usr/bin/env python3
"""How many page channels: relocd non-live migrations over 1, 2, 4 ... channels, interleaved (issue 13).

Each repeat runs raw loopback TCP and one relocd non-live migration per
channel count, in rotating order, between two daemons on loopback (sim
domain of non-zero pages, fresh target each run).  It prints the streaming
phase (pause to commit) and the whole operation for each count, and each
over raw TCP: the figures ``relocd-migration-channels``'s default was chosen
by (docs/memory.md).  A script, not a test.

With ``--tls`` each count also runs over TLS (both daemons with certificates
from a throwaway CA, client certificates required), and the TLS/plain ratio of
the streaming phase is printed: the issue's "TLS at speed" figure.

Usage: python bench/bench_channels.py [--memory MIB] [--repeat N] [--channels 1,2,4] [--live] [--tls]
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
from harness import DaemonProc, free_port  # noqa: E402

from relocd.tools.certs import make_ca, make_host_cert  # noqa: E402
from rawtcp import raw_loopback_transfer  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--memory", type=int, default=1024, help="guest size in MiB (default 1024)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--channels", default="1,2,4", help="comma-separated channel counts")
    ap.add_argument("--live", action="store_true", help="live, hotset:size=64MiB,rate=100MB/s (default: non-live)")
    ap.add_argument("--tls", action="store_true", help="also run each count over TLS")
    ap.add_argument("--guest-memory-dir", metavar="DIR", help="both daemons' relocd-guest-memory-dir")
    args = ap.parse_args()
    counts = [int(c) for c in args.channels.split(",")]
    nbytes = args.memory << 20
    revision = relocd_revision()
    variants = [(c, tls) for c in counts for tls in ((False, True) if args.tls else (False,))]
    runs: dict[str, list[dict[str, Any]]] = {"raw": [], **{key(c, t): [] for c, t in variants}}
    workload = "hotset:size=64MiB,rate=100MB/s" if args.live else "idle:fill=stamped"
    with tempfile.TemporaryDirectory(prefix="relocd-channels-") as tmp:
        slack = "(relocd-idle-timeout 60)\n(relocd-handshake-timeout 30)\n"
        tls_port = free_port("127.0.0.2")
        if args.guest_memory_dir:
            slack += f"(relocd-guest-memory-dir '{args.guest_memory_dir}')\n"
        extra = {"A": slack, "B": slack}
        if args.tls:
            pki = Path(tmp) / "pki"
            pki.mkdir()
            ca = make_ca(pki)
            for host, ip in (("A", "127.0.0.1"), ("B", "127.0.0.2")):
                files = make_host_cert(pki, f"host{host}", ips=(ip,))
                extra[host] += (f"(xend-relocation-ssl-server yes)\n(xend-relocation-ssl-port {tls_port})\n"
                                f"(xend-relocation-server-ssl-key-file '{files.key}')\n"
                                f"(xend-relocation-server-ssl-cert-file '{files.cert}')\n"
                                f"(relocd-relocation-ssl-ca-file '{ca.cert}')\n")
        a = DaemonProc(Path(tmp), "A", "127.0.0.1", extra_config=extra["A"])
        b = DaemonProc(Path(tmp), "B", "127.0.0.2", extra_config=extra["B"])
        try:
            a.start()
            b.start()
            steps: list[tuple[str, Any]] = [("raw", lambda: {"wall_s": raw_loopback_transfer(nbytes)})]
            for c, tls in variants:
                how: dict[str, Any] = {"channels": c}
                if tls:
                    how.update(ssl=True, port=tls_port)
                steps.append((key(c, tls), lambda how=how: asyncio.run(
                    relocd_migration(a, b, args.memory, workload, args.live, how))))
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
    for c, tls in variants:
        k = key(c, tls)
        total, stream, down = med(k, "total_s"), med(k, "stream_s"), med(k, "downtime_ms")
        if total is None or stream is None:
            print(f"  {c} channel(s){' TLS' if tls else ''}: no run completed")
            continue
        line = f"  {c:>2} channel(s){' TLS  ' if tls else ' plain'}: total {total:.2f} s, streaming {stream:.2f} s"
        if raw:
            line += f", streaming vs raw TCP {raw / stream:.2f}x"
        if tls:
            plain = med(key(c, False), "stream_s")
            if plain:
                line += f", TLS vs plain {plain / stream:.2f}x"
        if args.live and down is not None:
            line += f", downtime {down:.1f} ms"
        print(line)
    return 0


def key(channels: int, tls: bool) -> str:
    return f"ch{channels}" + ("-tls" if tls else "")


if __name__ == "__main__":
    sys.exit(main())
