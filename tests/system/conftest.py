"""Fixtures for system tests: skip cleanly unless root + ip + netns work; the lab."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from tests.lab.netlab import NetLab


@functools.cache
def netns_unavailable() -> str | None:
    """Why network-namespace tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth, raw sockets)"
    for tool in ("ip", "bridge"):
        if shutil.which(tool) is None:
            return f"needs iproute2's `{tool}`"
    probe = f"rl-probe-{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    try:
        veth = subprocess.run(
            ["ip", "-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1"],
            capture_output=True, text=True,
        )
        bridge = subprocess.run(
            ["ip", "-n", probe, "link", "add", "b0", "type", "bridge"], capture_output=True, text=True
        )
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    if veth.returncode or bridge.returncode:
        return f"kernel lacks veth or bridge: {(veth.stderr or bridge.stderr).strip()}"
    return None


@pytest.fixture
def needs_netns() -> None:
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def netlab(needs_netns: None) -> Iterator[NetLab]:
    """A fresh two-host lab with a random tag, torn down even when the test fails."""
    with NetLab() as lab:
        yield lab
