"""Run inside the lab's dom0: exercise relocd's xen driver against the lab's domU.

Prints one JSON object (``XENCHECK {...}``) with what each operation saw; the
host-side system test asserts on it.  Expects domain ``domu`` to be running.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from relocd.drivers import load_driver
from relocd.drivers.base import DomainState
from relocd.drivers.xen import XenDomain
from relocd.errors import DriverError


def xl_names() -> list[str]:
    out = subprocess.run(["xl", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines()[1:] if line.strip()]


def console_count(name: str) -> int:
    """The last number the domU's counter printed (xenconsoled's log of its console)."""
    text = Path(f"/var/log/xen/console/guest-{name}.log").read_text(errors="replace")
    counts = [int(line.split()[1]) for line in text.splitlines() if line.startswith("count ")]
    return counts[-1] if counts else 0


async def main() -> dict[str, Any]:
    out: dict[str, Any] = {}
    driver = load_driver("xen", Path("/run/relocd-check"))
    await driver.start()
    caps = await driver.capabilities()
    out["caps"] = {
        "free_memory_mib": caps.free_memory_bytes >> 20,
        "max_vcpus": caps.max_vcpus,
        "has_sse2": "sse2" in caps.cpu_features,
        "nfeatures": len(caps.cpu_features),
    }
    domains = driver.domains()
    out["listed"] = [(d.name, d.config.memory_mib, d.config.vcpus, d.state.value) for d in domains]
    dom = driver.lookup("domu")
    assert isinstance(dom, XenDomain)
    cfg = await dom.read_config()
    out["config"] = cfg.model_dump(mode="json", include={"name", "uuid", "memory_mib", "vcpus", "extra"})

    await dom.pause()
    out["paused_state"] = dom.state.value
    before = console_count("domu")
    await asyncio.sleep(3)
    out["count_while_paused"] = [before, console_count("domu")]
    await dom.resume()
    out["resumed_state"] = dom.state.value
    await asyncio.sleep(3)
    out["count_after_resume"] = console_count("domu")

    try:
        dom.memory()
        out["memory"] = "returned"
    except DriverError as exc:
        out["memory"] = exc.message

    await dom.rename("domu-renamed")
    out["after_rename"] = xl_names()
    await dom.rename("domu")

    clone = cfg.model_copy(update={"name": "domu2", "uuid": "0b1f6b3e-4f0a-4bd5-9d0e-2f3b9b0c1a22", "vifs": ()})
    made = await driver.create(clone)
    out["created"] = [made.name, made.domid, made.state is DomainState.RUNNING, sorted(d.name for d in driver.domains())]
    await made.destroy()
    await made.destroy()  # idempotent
    out["after_destroy"] = xl_names()
    await driver.close()
    return out


if __name__ == "__main__":
    result = asyncio.run(main())
    print("XENCHECK " + json.dumps(result), flush=True)
    sys.exit(0)
