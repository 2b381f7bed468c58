"""Sizes and rates as operators write them: ``512M``, ``64MiB``, ``1GB/s``.

One rule for every size, as xl and xend read them, plus SI and IEC units:

* a bare letter is binary, as in xl (``512M`` = 512 MiB, ``2G`` = 2 GiB);
* ``KiB``/``MiB``/``GiB``/``TiB`` are binary (IEC);
* ``kB``/``MB``/``GB``/``TB`` are decimal (SI), as network people write rates
  (``1GB/s`` = 10^9 bytes a second);
* a number without a unit is bytes, except where the caller says otherwise
  (``relocd create --memory 512`` is MiB, as xm's ``memory=``).

Rates are sizes per second; they may also be written in bits
(``10Gbit/s``, ``100Mbps``: decimal, divided by 8).
"""

from __future__ import annotations

import re

PAGE_SIZE = 4096
PAGE_SHIFT = 12

_UNITS = {
    "": 1,
    "b": 1,
    # xl's bare letters: binary
    "k": 1 << 10,
    "m": 1 << 20,
    "g": 1 << 30,
    "t": 1 << 40,
    # SI
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    # IEC
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}

#: bits per second, decimal (what a NIC's speed is written in)
_BIT_UNITS = {"bit": 1, "kbit": 1000, "mbit": 1000**2, "gbit": 1000**3, "tbit": 1000**4}

_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")

#: What --help and error messages say about units, in one place.
SIZE_UNITS_HELP = "K/M/G/T and KiB/MiB/GiB are binary (1M = 2^20 bytes), kB/MB/GB decimal"
RATE_UNITS_HELP = "MB/s and GB/s are decimal (1MB/s = 10^6 bytes/s), MiB/s binary, Gbit/s bits"


def parse_size(text: str, *, default_unit: int = 1) -> int:
    """Parse a byte count such as ``512M``, ``64MiB`` or ``1GB``.

    A number without a unit is multiplied by ``default_unit`` (bytes unless
    the caller says otherwise).
    """
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r}")
    unit = m.group(2).lower()
    if unit not in _UNITS:
        raise ValueError(f"unknown size unit {m.group(2)!r} in {text!r} ({SIZE_UNITS_HELP})")
    scale = default_unit if unit == "" else _UNITS[unit]
    return int(float(m.group(1)) * scale)


def has_unit(text: str) -> bool:
    """Whether a size or rate names its unit (``100MB/s``: yes; ``100``: no)."""
    m = _SIZE_RE.match(text.strip().removesuffix("/s").removesuffix("/S"))
    return m is None or m.group(2) != ""


def parse_rate(text: str) -> int:
    """Parse a rate in bytes per second such as ``100MB/s``, ``1GiB/s`` or ``10Gbit/s``."""
    t = text.strip()
    if t.lower().endswith("/s"):
        t = t[:-2]
    elif t.lower().endswith("bps"):
        t = t[:-3] + "bit"  # 100Mbps: bits, as NIC speeds are written
    m = _SIZE_RE.match(t)
    if m and m.group(2).lower() in _BIT_UNITS:
        return int(float(m.group(1)) * _BIT_UNITS[m.group(2).lower()] / 8)
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


def format_duration(seconds: float) -> str:
    """``42 s``, ``3:05``, ``1:02:03``: an ETA or an elapsed time."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}:{s % 60:02d}"
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
