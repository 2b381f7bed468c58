"""Fixtures for system tests: skip cleanly unless root + ip + netns work; the lab; /dev/kvm."""

from __future__ import annotations

import fcntl
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


KVM_DEVICE = "/dev/kvm"
KVM_GET_API_VERSION = 0xAE00  # _IO(KVMIO, 0x00), from <linux/kvm.h>
KVM_API_VERSION = 12


@functools.cache
def kvm_device_problem(path: str = KVM_DEVICE) -> str | None:
    """Why /dev/kvm cannot be used, or None: asked of the kernel directly, never through relocd.

    The probe must not share code with the driver under test: if it did, a
    regression there would read as "no KVM here" and skip every KVM test.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return f"no {path}"
    except OSError as exc:
        return f"cannot open {path}: {exc.strerror or exc}"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as exc:
        return f"{path} refuses KVM_GET_API_VERSION: {exc.strerror or exc}"
    finally:
        os.close(fd)
    if version != KVM_API_VERSION:
        return f"{path} speaks KVM API version {version}, not {KVM_API_VERSION}"
    return None


def kvm_required(path: str = KVM_DEVICE) -> bool:
    """Root with /dev/kvm present (as on CI, CI=true): KVM tests must run there, never skip."""
    return os.geteuid() == 0 and os.path.exists(path)


def require_kvm() -> None:
    """Skip where there is no usable /dev/kvm; fail instead where one is required."""
    problem = kvm_device_problem()
    if problem is None:
        return
    if kvm_required():
        ci = " (CI)" if os.environ.get("CI") == "true" else ""
        pytest.fail(f"running as root with {KVM_DEVICE} present{ci}, but {problem}", pytrace=False)
    pytest.skip(problem)


@pytest.fixture
def needs_kvm() -> None:
    require_kvm()
