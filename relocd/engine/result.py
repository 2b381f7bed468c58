"""What a migration reports: the JSON object of `relocd migrate --json`."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import Any

#: Progress callback: the daemon forwards these to `relocd migrate`'s display.
Progress = Callable[..., Awaitable[None]]


async def no_progress(**_: Any) -> None:
    return None


@dataclasses.dataclass
class RoundReport:
    round: int
    pages_sent: int
    bytes_sent: int
    duration_ms: float
    dirty_after: int


@dataclasses.dataclass
class MigrationResult:
    """Outcome of one migration, from the source's point of view."""

    domain: str
    live: bool
    migration_id: str
    status: str = "failed"  # completed | failed | rolled-back | cancelled
    iterations: int = 0
    pages_sent: int = 0
    zero_pages: int = 0
    bytes_sent: int = 0
    total_ms: float = 0.0
    downtime_ms: float = 0.0
    verified: bool | None = None
    error: str | None = None
    stop_reason: str | None = None
    #: auto-converge was on (and the driver can throttle); the highest throttle applied, %
    auto_converge: bool = False
    throttle_pct: float = 0.0
    #: the downtime policy's target, and a warning when the stop was predicted to overshoot it 2x
    downtime_target_ms: float | None = None
    downtime_warning: str | None = None
    #: where the downtime went: pause, last pages, vCPU state, commit, prepare, GO (the
    #: handoff's rename and journal write), GO round trip (less the target's
    #: share), resume and announce (the target's, from its RESUMED details)
    downtime_breakdown_ms: dict[str, float] = dataclasses.field(default_factory=dict)
    #: the target's free memory as it reported it at reservation (evacuate spreads by it)
    target_free_bytes: int | None = None
    #: page channels used, the main connection included (docs/protocol.md, "Parallel channels")
    channels: int = 1
    target: str | None = None
    rounds: list[RoundReport] = dataclasses.field(default_factory=list)
    target_details: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: milestones, ms since the start: reserved, streaming, paused, committed, prepared, resumed, done
    timeline_ms: dict[str, float] = dataclasses.field(default_factory=dict)
    _t0: float = dataclasses.field(default_factory=time.monotonic, repr=False)

    def mark(self, milestone: str) -> None:
        self.timeline_ms[milestone] = round((time.monotonic() - self._t0) * 1000, 3)

    def breakdown(self) -> dict[str, float]:
        """The downtime's parts, from the milestones (and the target's own resume time)."""
        t = self.timeline_ms
        start = "pausing" if "pausing" in t else "paused"
        if start not in t or "resumed" not in t:
            return {}
        steps = [("pause", "paused"), ("last_pages", "last-pages"), ("vcpu_state", "state-sent"), ("commit", "committed"),
                 ("prepare", "prepared"), ("go", "go"), ("go_round_trip", "resumed")]  # fmt: skip
        out: dict[str, float] = {}
        at = t[start]
        for name, mark in steps:
            if mark in t:
                out[name] = round(t[mark] - at, 3)
                at = t[mark]
        for part, within in (("resume", "go_round_trip"), ("announce", "go_round_trip"), ("prepare", "prepare")):
            # the target's own share of a round trip, from its RESUMED details
            took = self.target_details.get(f"{part}_ms")
            if isinstance(took, (int, float)) and not isinstance(took, bool) and within in out:
                rest = round(max(0.0, out[within] - float(took)), 3)
                if part == "prepare":  # what is left: the last pages still going in, and the round trip
                    out["last_pages_in"] = rest
                else:
                    out[within] = rest
                out[part] = round(float(took), 3)
        return out

    def finish(self, status: str, error: str | None = None) -> MigrationResult:
        self.status = status
        self.error = error
        self.total_ms = round((time.monotonic() - self._t0) * 1000, 3)
        return self

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("_t0", None)
        d["downtime_ms"] = round(self.downtime_ms, 3)
        return d
