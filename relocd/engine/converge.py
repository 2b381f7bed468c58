"""Auto-converge: slow down a guest that dirties memory faster than precopy can send it.

QEMU's auto-converge throttles the vCPUs step by step (20%, then +10% a
step) once two rounds in a row dirtied more than half of what they sent.
relocd does the same, with one change: a step goes at least as far as the
throttle that would bring the guest's dirty rate to half the rate the last
round sent at (measured, not guessed), so a guest dirtying at twice the
link converges in two or three steps instead of eight.  What throttling
means is the driver's (``Domain.throttle``: sim slows its workload's
rate, kvm sleeps its vCPUs in proportion to their run time); a driver
that cannot throttle (``Domain.throttles`` false) migrates unthrottled and
the result says so.

The precopy loop asks ``after_round`` once per round; it answers the new
throttle fraction, or None to leave it.  ``may_rise`` tells the loop a stop
for lack of progress (or the traffic budget) can wait: the throttle still
has room.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from relocd.engine.policy import RoundStats
from relocd.units import PAGE_SIZE

#: QEMU's cpu-throttle-initial, cpu-throttle-increment and max-cpu-throttle (as fractions)
INITIAL = 0.20
STEP = 0.10
MAXIMUM = 0.99
#: a round "does not converge" when it left at least this share of what it sent dirty again
DIRTY_SHARE = 0.5
#: ... this many rounds in a row before the first step (QEMU: 2)
ROUNDS_BEFORE_FIRST_STEP = 2
#: the dirty rate a step aims for, as a share of the rate the last round sent at
AIM = 0.5


@dataclass
class AutoConverge:
    enabled: bool = True
    #: the throttle now applied, 0.0 to MAXIMUM
    throttle: float = 0.0
    #: every step taken, as (round, fraction): shown in the result
    steps: list[tuple[int, float]] = field(default_factory=list)
    _high_rounds: int = 0

    @property
    def may_rise(self) -> bool:
        return self.enabled and self.throttle < MAXIMUM

    def after_round(self, stats: RoundStats, expected_downtime_ms: float | None, target_ms: float | None) -> float | None:
        """The throttle to apply after this round, or None to keep the current one."""
        if not self.enabled or stats.round < 2 or stats.duration_s <= 0:
            return None
        if target_ms is not None and expected_downtime_ms is not None and expected_downtime_ms <= target_ms:
            self._high_rounds = 0
            return None  # converging: the policy stops now
        if stats.dirty_pages < DIRTY_SHARE * max(1, stats.pages_sent):
            self._high_rounds = 0
            return None
        self._high_rounds += 1
        if self.throttle == 0.0 and self._high_rounds < ROUNDS_BEFORE_FIRST_STEP:
            return None
        if self.throttle >= MAXIMUM:
            return None
        step = INITIAL if self.throttle == 0.0 else self.throttle + STEP
        send_rate = stats.bytes_sent / stats.duration_s
        dirty_rate = stats.dirty_pages * PAGE_SIZE / stats.duration_s
        unthrottled = dirty_rate / max(1e-6, 1.0 - self.throttle)
        if unthrottled > 0 and send_rate > 0:
            step = max(step, 1.0 - AIM * send_rate / unthrottled)
        self.throttle = round(min(MAXIMUM, step), 3)
        self.steps.append((stats.round, self.throttle))
        return self.throttle
