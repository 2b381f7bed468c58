"""Sizes and rates as operators write them: ``64MiB``, ``1GB/s``, ``100M``."""

from __future__ import annotations

import re

PAGE_SIZE = 4096
PAGE_SHIFT = 12

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}

_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """Parse a byte count such as ``64MiB`` or ``1GB`` (decimal K/M/G, binary KiB/MiB/GiB)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r}")
    unit = m.group(2).lower()
    if unit not in _UNITS:
        raise ValueError(f"unknown size unit {m.group(2)!r} in {text!r}")
    return int(float(m.group(1)) * _UNITS[unit])


def parse_rate(text: str) -> int:
    """Parse a rate in bytes per second such as ``100MB/s`` or ``1GiB/s``."""
    t = text.strip()
    if t.lower().endswith("/s"):
        t = t[:-2]
    return parse_size(t)


def format_bytes(n: float) -> str:
    """Human-readable binary size: ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_rate(bytes_per_s: float) -> str:
    """Human-readable rate in decimal units, as network people read them: ``2.7 GB/s``."""
    for unit in ("B/s", "kB/s", "MB/s", "GB/s"):
        if abs(bytes_per_s) < 1000 or unit == "GB/s":
            return f"{bytes_per_s:.1f} {unit}"
        bytes_per_s /= 1000
    raise AssertionError("unreachable")
