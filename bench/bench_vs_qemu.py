#!/usr/bin/env python3
"""relocd against QEMU's own migration, side by side in one run (issue 13); a script, not a test.

Each repeat runs, interleaved (the order rotates from one repeat to the next,
so drift on a shared machine hits every side alike):

* raw loopback TCP of the same bytes between two pre-touched buffers
  (``rawtcp.py``): the ceiling of any stream;
* QEMU ``migrate``, one stream, and QEMU multifd with 4 channels: TCG, a
  paused guest (``-S``, never started, no disk) whose RAM is a file of random
  bytes, a fresh target (``-incoming defer``, fresh anonymous RAM) each run;
  timed from the ``migrate`` command to the source's ``query-migrate`` saying
  ``completed`` (QEMU's own ``total-time`` is reported too);
* relocd non-live ``migrate`` of a sim domain of the same size, full of
  non-zero pages, between two daemons on loopback, fresh target each run:
  the whole operation (``total_ms``), the reservation and the streaming phase
  (pause to commit) from its ``timeline_ms``;
* relocd live ``migrate`` under ``hotset:size=64MiB,rate=100MB/s`` with default
  settings: downtime, rounds, total.

CPU seconds per GiB moved are the utime + stime, over the migration, of the
two daemons and their domain processes (sampled every 10 ms from /proc), and
of the two QEMU processes.  Without ``qemu-system-x86_64`` (Debian's
``qemu-system-x86``) the QEMU half is skipped with a message.

Usage: python bench/bench_vs_qemu.py [--memory MIB] [--repeat N] [--json | --save-json PATH] [--no-qemu]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "daemon"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_migrate import warm_host_memory  # noqa: E402
from harness import DaemonProc, free_port  # noqa: E402
from qemu_helpers import QMPError, cpu_seconds, qemu_binary, qemu_migration, qemu_version, random_file  # noqa: E402
from rawtcp import raw_loopback_transfer  # noqa: E402

HOTSET = "hotset:size=64MiB,rate=100MB/s"
GIB = 1 << 30


def _ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    return int(stat[stat.rfind(b")") + 2 :].split()[1])


class CpuSampler:
    """utime + stime of some processes and their children over a span, sampled every 10 ms.

    A process seen at the start counts from its value then; one that appears
    later (the target's domain process) counts whole.  A process that exits
    in the span (the source's domain process) loses at most its last 10 ms.
    """

    def __init__(self, roots: list[int], interval: float = 0.01) -> None:
        self.roots = roots
        self.interval = interval
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        #: pids looked at once: their parent, or None where they are gone
        self._parent: dict[int, int | None] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._sample(initial=True)

    def _pids(self) -> list[int]:
        """The roots and their children (no /proc/PID/task/*/children on every kernel: by ppid)."""
        pids = list(self.roots)
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            if pid not in self._parent:
                try:
                    self._parent[pid] = _ppid(pid)
                except (OSError, IndexError, ValueError):
                    self._parent[pid] = None
            if self._parent[pid] in self.roots:
                pids.append(pid)
        return pids

    def _sample(self, initial: bool = False) -> None:
        for pid in self._pids():
            try:
                value = cpu_seconds(pid)
            except (OSError, IndexError, ValueError):
                continue
            if pid not in self.first:
                self.first[pid] = value if initial else 0.0
            self.last[pid] = value

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def seconds(self) -> float:
        return sum(self.last[p] - self.first[p] for p in self.last)


class RunFailed(RuntimeError):
    """One run did not complete: reported, left out of the medians, and the benchmark goes on."""


async def relocd_migration(a: DaemonProc, b: DaemonProc, memory: int, workload: str, live: bool,
                           extra: dict[str, Any]) -> dict[str, Any]:
    try:
        await a.call("create", name="vsqemu", memory=memory, workload=workload, driver="sim")
    except Exception as exc:  # reported and left out of the medians, like a failed move
        raise RunFailed(f"create failed: {exc}") from None
    await asyncio.sleep(0.5)
    assert a.proc is not None and b.proc is not None
    try:
        with CpuSampler([a.proc.pid, b.proc.pid]) as cpu:
            t0 = time.monotonic()
            how = {"port": b.port, **extra}  # extra may name another port (TLS)
            result: dict[str, Any] = await a.call("migrate", name="vsqemu", host=b.address, live=live, **how)
            wall = time.monotonic() - t0
    except BaseException:
        for d in (a, b):  # leave no domain behind for the next run; whichever side holds it
            with contextlib.suppress(Exception):
                await d.call("destroy", name="vsqemu")
        raise
    if result.get("status") != "completed":
        for d in (a, b):
            with contextlib.suppress(Exception):
                await d.call("destroy", name="vsqemu")
        raise RunFailed(f"relocd migration {result.get('status')}: {result.get('error')}")
    await b.call("destroy", name="vsqemu")
    t = result.get("timeline_ms") or {}
    out = {
        "wall_s": wall,
        "total_s": float(result["total_ms"]) / 1000,
        "reservation_s": float(t["reserved"]) / 1000 if "reserved" in t else None,
        "stream_s": (float(t["committed"]) - float(t["paused"])) / 1000
        if "committed" in t and "paused" in t else None,
        "downtime_ms": float(result.get("downtime_ms") or 0.0),
        "rounds": int(result.get("iterations") or 0),
        "channels": int(result.get("channels") or 1),
        "downtime_breakdown_ms": result.get("downtime_breakdown_ms") or {},
        "stop_reason": result.get("stop_reason"),
        "cpu_s": cpu.seconds(),
        "timeline_ms": t,
        "round_reports": result.get("rounds") or [],
    }
    return out


def relocd_revision() -> str:
    """The commit measured, and whether relocd/ differed from it (a shared working tree)."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "relocd"], check=True,
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + (" + uncommitted changes in relocd/" if dirty else "")


def med(runs: list[dict[str, Any]], key: str) -> float | None:
    vals = [float(r[key]) for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def spread(runs: list[dict[str, Any]], key: str, scale: float = 1.0, digits: int = 2) -> list[float]:
    return [round(float(r[key]) * scale, digits) for r in runs if r.get(key) is not None]


def ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--memory", type=int, default=1024, help="guest size in MiB (default 1024)")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved runs of each; the median is reported")
    ap.add_argument("--warm-gib", type=int, default=3, help="touch this much host memory first (0: skip)")
    ap.add_argument("--no-qemu", action="store_true", help="skip QEMU even where it is installed")
    ap.add_argument("--multifd-channels", type=int, default=4)
    ap.add_argument("--guest-memory-dir", metavar="DIR",
                    help="both daemons' relocd-guest-memory-dir (a tmpfs mounted huge=always: 2 MiB pages)")
    ap.add_argument("--channels", type=int, default=None, help="relocd migrate --channels (default: the daemon's)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON instead of the table")
    ap.add_argument("--save-json", metavar="PATH", help="also write the JSON (with every run) to PATH")
    args = ap.parse_args()
    nbytes = args.memory << 20
    revision = relocd_revision()  # at the start: others may commit while it runs
    gib_moved = nbytes / GIB

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    qemu = None if args.no_qemu else qemu_binary()
    qemu_skip = None
    if args.no_qemu:
        qemu_skip = "--no-qemu"
    elif qemu is None:
        qemu_skip = ("qemu-system-x86_64 not found: skipping QEMU's half "
                     "(Debian: apt-get install qemu-system-x86)")
        log(qemu_skip)
    if args.warm_gib:
        log(f"warming {args.warm_gib} GiB of host memory: {warm_host_memory(args.warm_gib):.1f} s")

    runs: dict[str, list[dict[str, Any]]] = {"raw": [], "qemu_single": [], "qemu_multifd": [],
                                             "relocd_nonlive": [], "relocd_live": []}
    failed: list[dict[str, Any]] = []
    shm = Path("/dev/shm")
    ram_dir = shm if shm.is_dir() and os.statvfs(shm).f_bavail * os.statvfs(shm).f_frsize > 2 * nbytes else None
    with tempfile.TemporaryDirectory(prefix="relocd-vsqemu-") as tmp, \
            tempfile.TemporaryDirectory(prefix="relocd-vsqemu-ram-", dir=ram_dir) as ramtmp:
        tmpdir = Path(tmp)
        ram_file = Path(ramtmp) / "guest.ram"
        if qemu:
            log(f"{qemu_version(qemu)}; source RAM: {nbytes >> 20} MiB of random bytes in {ram_file.parent}: "
                f"{random_file(ram_file, nbytes):.1f} s")
        # the harness's 10 s idle timeout is for tests; a loaded 2-core machine can
        # take longer than that to reserve a large guest, so give the peers a minute
        slack = "(relocd-idle-timeout 60)\n(relocd-handshake-timeout 30)"
        if args.guest_memory_dir:
            slack += f"\n(relocd-guest-memory-dir '{args.guest_memory_dir}')"
        how: dict[str, Any] = {} if args.channels is None else {"channels": args.channels}
        a = DaemonProc(tmpdir, "A", "127.0.0.1", extra_config=slack)
        b = DaemonProc(tmpdir, "B", "127.0.0.2", extra_config=slack)
        try:
            a.start()
            b.start()

            def raw() -> dict[str, Any]:
                return {"wall_s": raw_loopback_transfer(nbytes)}

            def qemu_single() -> dict[str, Any]:
                assert qemu
                return qemu_migration(qemu, tmpdir, args.memory, ram_file, free_port())

            def qemu_multifd() -> dict[str, Any]:
                assert qemu
                return qemu_migration(qemu, tmpdir, args.memory, ram_file, free_port(),
                                      multifd_channels=args.multifd_channels)

            def nonlive() -> dict[str, Any]:
                return asyncio.run(relocd_migration(a, b, args.memory, "idle:fill=stamped", False, how))

            def live() -> dict[str, Any]:
                return asyncio.run(relocd_migration(a, b, args.memory, HOTSET, True, how))

            steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [("raw", raw)]
            if qemu:
                steps += [("qemu_single", qemu_single), ("qemu_multifd", qemu_multifd)]
            steps += [("relocd_nonlive", nonlive), ("relocd_live", live)]
            for i in range(args.repeat):
                k = i % len(steps)
                for name, fn in steps[k:] + steps[:k]:
                    try:
                        r = fn()
                    except (RunFailed, QMPError) as e:
                        failed.append({"run": i + 1, "what": name, "error": str(e)})
                        log(f"run {i + 1}/{args.repeat} {name}: FAILED: {e}")
                        continue
                    runs[name].append(r)
                    shown = r.get("total_s", r["wall_s"])
                    log(f"run {i + 1}/{args.repeat} {name}: {shown:.3f} s"
                        + (f", cpu {r['cpu_s']:.2f} s" if "cpu_s" in r else "")
                        + (f", downtime {r['downtime_ms']:.1f} ms, {r['rounds']} rounds" if name == "relocd_live" else ""))
        finally:
            a.stop()
            b.stop()
            a.cleanup()
            b.cleanup()

    raw_s = med(runs["raw"], "wall_s")
    qs = med(runs["qemu_single"], "wall_s")
    qm = med(runs["qemu_multifd"], "wall_s")
    nl = runs["relocd_nonlive"]
    lv = runs["relocd_live"]
    nl_total = med(nl, "total_s")
    nl_stream = med(nl, "stream_s")
    channels = max((int(r["channels"]) for r in nl), default=1)
    lv_total = med(lv, "total_s")
    cpu_per_gib = {
        name: (c / gib_moved if (c := med(runs[name], "cpu_s")) is not None else None)
        for name in ("qemu_single", "qemu_multifd", "relocd_nonlive", "relocd_live")
    }
    out: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "memory_mib": args.memory,
        "repeat": args.repeat,
        "cpus": os.cpu_count(),
        "relocd": revision,
        "guest_memory_dir": args.guest_memory_dir,
        "qemu": qemu_version(qemu) if qemu else None,
        "qemu_skipped": qemu_skip,
        "raw_tcp_s": raw_s,
        "qemu_single_s": qs,
        "qemu_single_total_time_ms": med(runs["qemu_single"], "total_time_ms"),
        "qemu_single_target_done_s": med(runs["qemu_single"], "target_done_s"),
        "qemu_multifd_s": qm,
        "qemu_multifd_total_time_ms": med(runs["qemu_multifd"], "total_time_ms"),
        "qemu_multifd_target_done_s": med(runs["qemu_multifd"], "target_done_s"),
        "qemu_multifd_channels": args.multifd_channels,
        "relocd_nonlive_total_s": nl_total,
        "relocd_nonlive_reservation_s": med(nl, "reservation_s"),
        "relocd_nonlive_stream_s": nl_stream,
        "relocd_channels": channels,
        "relocd_live_downtime_ms": med(lv, "downtime_ms"),
        "relocd_live_rounds": [int(r["rounds"]) for r in lv],
        "relocd_live_total_s": lv_total,
        # >= 1 means relocd is faster: QEMU's time over relocd's whole non-live operation
        "speedup_vs_qemu_single": ratio(qs, nl_total),
        "speedup_vs_qemu_multifd": ratio(qm, nl_total),
        "stream_vs_raw_tcp": ratio(raw_s, nl_stream),
        "stream_vs_raw_tcp_per_channel": ratio(ratio(raw_s, nl_stream), channels),
        "live_vs_nonlive_total": ratio(lv_total, nl_total),
        "cpu_s_per_gib": cpu_per_gib,
        "spread": {
            "raw_tcp_s": spread(runs["raw"], "wall_s"),
            "qemu_single_s": spread(runs["qemu_single"], "wall_s"),
            "qemu_multifd_s": spread(runs["qemu_multifd"], "wall_s"),
            "relocd_nonlive_total_s": spread(nl, "total_s"),
            "relocd_nonlive_reservation_s": spread(nl, "reservation_s"),
            "relocd_nonlive_stream_s": spread(nl, "stream_s"),
            "relocd_live_downtime_ms": spread(lv, "downtime_ms", digits=1),
            "relocd_live_total_s": spread(lv, "total_s"),
        },
        "failed": failed,
        "runs": runs,
    }
    if args.save_json:
        Path(args.save_json).write_text(json.dumps(out, indent=2) + "\n")
    if args.json:
        print(json.dumps(out, indent=2))
        return 0

    def s(v: float | None, unit: str = "s", fmt: str = ".2f") -> str:
        return "—" if v is None else f"{v:{fmt}} {unit}".rstrip()

    def x(v: float | None) -> str:
        return "—" if v is None else f"{v:.2f}×"

    sp = out["spread"]

    def rng(key: str) -> str:
        vals = sp[key]
        return f"  [{min(vals)}–{max(vals)}]" if len(vals) > 1 else ""

    print(f"{args.memory} MiB guest, median of {args.repeat} interleaved runs, {os.cpu_count()} cpus, loopback, "
          f"{out['date']}" + (f"; {out['qemu']}" if qemu else "") + f"; relocd {revision}")
    if qemu_skip:
        print(f"QEMU: skipped ({qemu_skip})")
    if args.guest_memory_dir:
        print(f"relocd guest memory in {args.guest_memory_dir}")
    for f in failed:
        print(f"FAILED (left out of the medians): run {f['run']} {f['what']}: {f['error']}")
    rows = [
        ("raw loopback TCP, pre-touched buffers", s(raw_s) + rng("raw_tcp_s")),
        ("QEMU migrate, one stream (migrate → completed)",
         s(qs) + rng("qemu_single_s") + (f"  (QEMU total-time {out['qemu_single_total_time_ms']:.0f} ms)" if qs else "")),
        (f"QEMU multifd, {args.multifd_channels} channels",
         s(qm) + rng("qemu_multifd_s") + (f"  (QEMU total-time {out['qemu_multifd_total_time_ms']:.0f} ms)" if qm else "")),
        ("relocd non-live, whole operation (total_ms)", s(nl_total) + rng("relocd_nonlive_total_s")),
        ("  … reservation (until reserved)", s(out["relocd_nonlive_reservation_s"]) + rng("relocd_nonlive_reservation_s")),
        ("  … streaming phase (paused → committed)", s(nl_stream) + rng("relocd_nonlive_stream_s")),
        (f"relocd live, {HOTSET}, downtime",
         s(out["relocd_live_downtime_ms"], "ms", ".1f") + rng("relocd_live_downtime_ms")
         + f", rounds {out['relocd_live_rounds']}"),
        ("  … total", s(lv_total) + rng("relocd_live_total_s")),
    ]
    width = max(len(r[0]) for r in rows)
    for label, val in rows:
        print(f"  {label:<{width}}  {val}")
    print("ratios (QEMU's time ÷ relocd's: ≥ 1 means relocd is faster):")
    print(f"  relocd non-live vs QEMU one stream:      {x(out['speedup_vs_qemu_single'])}  (target ≥ 2)")
    print(f"  relocd non-live vs QEMU multifd-{args.multifd_channels}:       "
          f"{x(out['speedup_vs_qemu_multifd'])}  (target ≥ 1)")
    print(f"  streaming phase vs raw TCP ({channels} channel{'s' if channels > 1 else ''}):  "
          f"{x(out['stream_vs_raw_tcp'])}  (target ≥ 0.8 per channel)")
    print(f"  live total vs non-live total:            {x(out['live_vs_nonlive_total'])}  (target ≤ 1.3)")
    print(f"  live downtime {s(out['relocd_live_downtime_ms'], 'ms', '.1f')} (target ≤ 20), "
          f"rounds {out['relocd_live_rounds']} (target ≤ 10)")
    print("CPU seconds per GiB moved (both ends):")
    for name, label in (("qemu_single", "QEMU one stream"), ("qemu_multifd", f"QEMU multifd-{args.multifd_channels}"),
                        ("relocd_nonlive", "relocd non-live"), ("relocd_live", "relocd live")):
        print(f"  {label:<18} {s(cpu_per_gib[name])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
