"""Xen's own toolstack command, ``xl``, for what must go through libxl.

Building a domain, destroying it and renaming it touch its devices, backends
and xenstore entries; libxl does all of that, and its API (an asynchronous
event loop, generated IDL structs) is impractical to bind through ctypes, so
the driver runs ``xl`` for these, as an operator would.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from typing import Any

from relocd.errors import DriverError

XL_TIMEOUT_S = 300.0


def xl_path() -> str:
    """The xl binary: $RELOCD_XL, else xl on PATH, else Debian's versioned location."""
    return os.environ.get("RELOCD_XL") or shutil.which("xl") or "/usr/lib/xen-4.17/bin/xl"


async def run_xl(*args: str, timeout: float = XL_TIMEOUT_S) -> str:
    """Run ``xl ARGS``; its stdout, or DriverError with its last error line."""
    try:
        proc = await asyncio.create_subprocess_exec(
            xl_path(), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
    except OSError as exc:
        raise DriverError(f"xen driver: cannot run xl: {exc}") from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise DriverError(f"xen driver: 'xl {' '.join(args)}' did not finish within {timeout:.0f}s") from None
    if proc.returncode != 0:
        lines = [line for line in err.decode(errors="replace").splitlines() if line.strip()]
        why = lines[-1].strip() if lines else f"exit status {proc.returncode}"
        raise DriverError(f"xen driver: 'xl {' '.join(args)}' failed: {why}")
    return out.decode(errors="replace")


async def domain_config_json(domid: int) -> dict[str, Any]:
    """libxl's configuration of one domain (``xl list -l``), as a dict."""
    text = await run_xl("list", "-l", str(domid))
    try:
        entries = json.loads(text)
        return dict(entries[0]["config"])
    except (ValueError, LookupError, TypeError) as exc:
        raise DriverError(f"xen driver: unreadable 'xl list -l {domid}' output: {exc}") from None


async def destroy(domid: int) -> None:
    await run_xl("destroy", str(domid))


async def rename(domid: int, new_name: str) -> None:
    await run_xl("rename", str(domid), new_name)


async def create(config_path: str, *, paused: bool = False) -> None:
    args = ["create", "-q"] + (["-p"] if paused else []) + [config_path]
    await run_xl(*args)
