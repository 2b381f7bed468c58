"""Workload specs (``--workload``): what a guest does while it runs, in every process-based driver.

Spec syntax: ``KIND[:key=value,...]`` with

* ``idle`` -- writes nothing,
* ``uniform:rate=100MB/s`` -- random pages over all of memory,
* ``hotset:size=64MiB,rate=200MB/s`` -- random pages in the first ``size``
  bytes of data pages,
* ``sweep:rate=1GB/s`` -- every data page in order, wrapping around,

and, for every kind, ``fill=stamped|zero``: how the guest initialises memory at
boot (``stamped``, the default: every data page at generation 1, so memory is
full of non-zero data; ``zero``: pages stay zero until first written).
Missing values default to the examples above.  The guests that carry a spec
out live with their drivers (``sim/workload.py``, ``kvm/guest/``).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from relocd.errors import ConfigError
from relocd.units import PAGE_SIZE, parse_rate, parse_size

Kind = Literal["idle", "uniform", "hotset", "sweep"]
Fill = Literal["stamped", "zero"]

KINDS: tuple[Kind, ...] = ("idle", "uniform", "hotset", "sweep")
FILLS: tuple[Fill, ...] = ("stamped", "zero")
DEFAULT_RATES: dict[Kind, int] = {
    "idle": 0,
    "uniform": 100 * 1000**2,
    "hotset": 200 * 1000**2,
    "sweep": 1000**3,
}
DEFAULT_HOT_BYTES = 64 << 20
_KEYS: dict[Kind, frozenset[str]] = {
    "idle": frozenset({"fill"}),
    "uniform": frozenset({"rate", "fill"}),
    "hotset": frozenset({"rate", "size", "fill"}),
    "sweep": frozenset({"rate", "fill"}),
}


@dataclasses.dataclass(frozen=True)
class WorkloadSpec:
    """A parsed ``--workload`` value."""

    kind: Kind = "idle"
    rate_bytes: int = 0
    hot_bytes: int = 0
    fill: Fill = "stamped"

    def __str__(self) -> str:
        """Canonical spec text; ``parse_workload(str(spec)) == spec``."""
        opts: list[str] = []
        if self.kind == "hotset":
            opts.append(f"size={self.hot_bytes}")
        if self.kind != "idle":
            opts.append(f"rate={self.rate_bytes}")
        if self.fill != "stamped":
            opts.append(f"fill={self.fill}")
        return self.kind + (":" + ",".join(opts) if opts else "")


def parse_workload(spec: str) -> WorkloadSpec:
    """Parse a workload spec; ConfigError with a one-line reason when it is wrong."""
    text = spec.strip()
    kind_text, _, opts_text = text.partition(":")
    kind_text = kind_text.strip().lower()
    if kind_text not in KINDS:
        raise ConfigError(f"workload {spec!r}: unknown kind {kind_text!r} (known: {', '.join(KINDS)})")
    kind: Kind = kind_text
    values: dict[str, str] = {}
    if opts_text.strip() or ":" in text:
        for item in opts_text.split(","):
            key, eq, value = (part.strip() for part in item.partition("="))
            if not eq or not key or not value:
                raise ConfigError(f"workload {spec!r}: expected key=value, got {item.strip()!r}")
            key = key.lower()
            if key not in _KEYS[kind]:
                allowed = ", ".join(sorted(_KEYS[kind]))
                raise ConfigError(f"workload {spec!r}: {kind} takes no option {key!r} (allowed: {allowed})")
            if key in values:
                raise ConfigError(f"workload {spec!r}: option {key!r} given twice")
            values[key] = value
    rate = DEFAULT_RATES[kind]
    if "rate" in values:
        try:
            rate = parse_rate(values["rate"])
        except ValueError as exc:
            raise ConfigError(f"workload {spec!r}: bad rate: {exc}") from None
        if rate <= 0:
            raise ConfigError(f"workload {spec!r}: rate must be positive")
    hot = DEFAULT_HOT_BYTES if kind == "hotset" else 0
    if "size" in values:
        try:
            hot = parse_size(values["size"])
        except ValueError as exc:
            raise ConfigError(f"workload {spec!r}: bad size: {exc}") from None
        if hot < PAGE_SIZE:
            raise ConfigError(f"workload {spec!r}: hot set must be at least one page ({PAGE_SIZE} bytes)")
    fill_text = values.get("fill", "stamped").lower()
    if fill_text not in FILLS:
        raise ConfigError(f"workload {spec!r}: fill must be one of {', '.join(FILLS)}")
    fill: Fill = fill_text
    return WorkloadSpec(kind=kind, rate_bytes=rate, hot_bytes=hot, fill=fill)
