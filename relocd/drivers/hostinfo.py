"""What this host offers, read from /proc and /sys: facts every driver reports the same way."""

from __future__ import annotations

import os
from pathlib import Path


def mem_available(meminfo: Path = Path("/proc/meminfo")) -> int:
    """MemAvailable in bytes (0 if the kernel does not say)."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def cpu_features(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU flags of the first processor (x86 ``flags``, Arm ``Features``)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() in ("flags", "Features"):
                return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def bridges(sys_net: Path = Path("/sys/class/net")) -> frozenset[str]:
    """Names of the network bridges on this host."""
    try:
        return frozenset(dev.name for dev in sys_net.iterdir() if (dev / "bridge").is_dir())
    except OSError:
        return frozenset()


def mount_of(path: Path, mountinfo: Path = Path("/proc/self/mountinfo")) -> tuple[str, str, str] | None:
    """(mount point, filesystem type, super options) of the mount holding ``path``, or None."""
    target = str(path.resolve())
    best: tuple[str, str, str] | None = None
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        point = fields[4].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, tail[0], tail[2])
    return best


def guest_memory_dir(path: Path) -> str:
    """Check ``relocd-guest-memory-dir`` (OSError, with the system's words, if unusable); what it gives.

    It must take nameless files (``O_TMPFILE``: tmpfs does); a tmpfs mounted
    ``huge=always`` (or ``within_size``) gives guest memory 2 MiB pages.
    """
    fd = os.open(path, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    os.close(fd)
    mount = mount_of(path)
    if mount is None:
        return "4 KiB pages (mount unknown)"
    point, fstype, options = mount
    huge = next((o.split("=", 1)[1] for o in options.split(",") if o.startswith("huge=")), "never")
    if fstype == "tmpfs" and huge in ("always", "within_size"):
        return f"2 MiB pages (tmpfs {point}, huge={huge})"
    return f"4 KiB pages ({fstype} {point}, huge={huge}: mount a tmpfs with huge=always for 2 MiB pages)"
