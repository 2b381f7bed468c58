"""What this host offers, read from /proc and /sys: facts every driver reports the same way."""

from __future__ import annotations

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
