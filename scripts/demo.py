#!/usr/bin/env python3
"""The main job, end to end: two local relocd daemons and one live migration.

Host A listens on 127.0.0.1, host B on 127.0.0.2 (both loopback, so no root
and no network needed).  A domain running a hotset workload is created on A,
live-migrated to B with the progress display, and verified on B.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "daemon"))

from harness import DaemonProc  # noqa: E402


def relocd(control: Path, *args: str) -> int:
    cmd = [sys.executable, "-m", "relocd", *args, "--control", str(control)]
    print(f"\n$ relocd {' '.join(args)}", flush=True)
    return subprocess.call(cmd)


def main() -> int:
    workload = os.environ.get("DEMO_WORKLOAD", "hotset:size=64MiB,rate=100MB/s")
    memory = os.environ.get("DEMO_MEMORY_MIB", "256")
    with tempfile.TemporaryDirectory(prefix="relocd-demo-") as tmp:
        a = DaemonProc(Path(tmp), "hostA", "127.0.0.1")
        b = DaemonProc(Path(tmp), "hostB", "127.0.0.2")
        try:
            print(f"starting host A on 127.0.0.1:{a.port} and host B on 127.0.0.2:{b.port} (logs in {tmp})")
            a.start()
            b.start()
            rc = relocd(a.control, "create", "web1", "--memory", memory, "--workload", workload)
            rc = rc or relocd(a.control, "list")
            # No --verify: it would hash all memory inside the downtime; the
            # page invariant is checked on host B after the move instead, so
            # the downtime shown is the real one.
            rc = rc or relocd(a.control, "migrate", "web1", "127.0.0.2", "--port", str(b.port), "--live")
            print("\nhost A:", flush=True)
            relocd(a.control, "list")
            print("\nhost B:", flush=True)
            relocd(b.control, "list")
            if rc == 0:
                check = asyncio.run(b.call("check", name="web1"))
                verdict = "holds" if check["ok"] else f"BROKEN: {check['problem']}"
                print(f"\npage invariant of web1 on host B: {verdict}; guest stats: {check['stats']}")
                rc = 0 if check["ok"] else 1
            return rc
        finally:
            a.stop()
            b.stop()
            a.cleanup()
            b.cleanup()


if __name__ == "__main__":
    sys.exit(main())
