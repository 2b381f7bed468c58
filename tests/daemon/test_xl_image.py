"""A real daemon without the xen driver, given a file `xl save` wrote: a clear answer, nothing built."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from harness import DaemonProc

from relocd.drivers.xen import xlimage

LIBXL_CONFIG = {
    "c_info": {"type": "pv", "name": "domu", "uuid": "0b5e8a4c-4f6e-4c1a-9d1e-5a6b7c8d9e0f"},
    "b_info": {"max_vcpus": 1, "max_memkb": 131072, "type.pv": {"kernel": "/var/lib/xen/domu-vmlinuz"}},
}


async def test_xl_image_on_a_daemon_without_xen(host: DaemonProc, tmp_path: Path) -> None:
    image = tmp_path / "domu.xlsave"
    image.write_bytes(xlimage.image_prefix(LIBXL_CONFIG) + b"libxenguest" * 1000 + xlimage.image_suffix())
    with pytest.raises(Exception) as info:
        await host.call("restore", file=str(image))
    assert str(info.value).strip().endswith(
        f"{image}: an xl save image (domain domu): restore it on a Xen host; this daemon has no xen driver"
    ), str(info.value)
    assert await host.call("list") == []
    described = await host.call("inspect", file=str(image))
    assert described["format"] == "an xl save image" and described["name"] == "domu"
    assert described["memory_mib"] == 128 and described["digest_ok"] is None

    # the command line: exit 1, one line on stderr, no traceback
    cli = subprocess.run(
        [sys.executable, "-m", "relocd", "restore", str(image), "--control", str(host.control)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert cli.returncode == 1, cli
    assert "restore it on a Xen host" in cli.stderr and "Traceback" not in cli.stderr
    assert len(cli.stderr.strip().splitlines()) == 1, cli.stderr
