"""Run inside the lab's dom0: move the domU through relocd's stream path (xc_domain_save -> xl restore).

Prints one JSON object (``XENSTREAM {...}``) for the host-side system test:
the move's report (every precopy round with relocd's decision), the console
counter before and after, and ``xl list``'s names.  Expects ``domu`` running.

    python3 check_stream.py xend-3 downtime    # one move per policy named, in order
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from relocd.drivers.xen.stream import move_within_host
from relocd.engine.policy import DowntimePolicy, PrecopyPolicy, XendPolicy

CONSOLE_LOGS = Path("/var/log/xen/console")


def xl_names() -> list[str]:
    out = subprocess.run(["xl", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines()[1:] if line.strip()]


def counts() -> dict[str, list[int]]:
    """Every guest console log's counter values, by file name."""
    found: dict[str, list[int]] = {}
    for log in sorted(CONSOLE_LOGS.glob("guest-*.log")):
        text = log.read_text(errors="replace")
        found[log.name] = [int(n) for n in re.findall(r"^count (\d+)\r?$", text, re.MULTILINE)]
    return found


def latest(seen: dict[str, list[int]]) -> int:
    return max((c[-1] for c in seen.values() if c), default=0)


def make_policy(name: str) -> PrecopyPolicy:
    if name == "xend-3":
        # Three rounds whatever the dirty set: shows relocd deciding round by round.
        return XendPolicy(max_iterations=3, dirty_threshold=0)
    return DowntimePolicy()


def domid_of(name: str) -> int:
    return int(subprocess.run(["xl", "domid", name], capture_output=True, text=True, check=True).stdout)


async def move_once(policy_name: str) -> dict[str, Any]:
    out: dict[str, Any] = {"policy": policy_name}
    work = Path("/run/relocd-stream")
    work.mkdir(parents=True, exist_ok=True)
    out["before"] = latest(counts())
    t0 = time.monotonic()
    out["move"] = await move_within_host("domu", make_policy(policy_name), work)
    out["move_s"] = round(time.monotonic() - t0, 2)
    out["xl_list"] = xl_names()
    out["domid_now"] = domid_of("domu")
    out["at_end"] = latest(counts())  # the source's last count, or the new copy's first
    await asyncio.sleep(4)
    seen = counts()
    out["after"] = latest(seen)
    out["ones"] = sum(c.count(1) for c in seen.values())
    out["logs"] = {name: (c[0], c[-1], len(c)) for name, c in seen.items() if c}
    return out


async def main(policy_names: list[str]) -> list[dict[str, Any]]:
    return [await move_once(name) for name in policy_names]


if __name__ == "__main__":
    result = asyncio.run(main(sys.argv[1:] or ["xend-3"]))
    print("XENSTREAM " + json.dumps(result), flush=True)
