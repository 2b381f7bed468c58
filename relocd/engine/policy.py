"""When to stop precopy, and how fast to send.

The precopy loop calls ``should_stop`` once after each round, in order, with
that round's numbers.  A policy object is stateful and serves one migration:
make a fresh one with ``make_policy`` for each.

xend's rules come from ``xc_domain_save`` (libxc), which after each live round
starts the last iteration when::

    iter >= max_iters                      (29: "limit us to 30 times round loop")
    || sent_this_iter + skip_this_iter < 50
    || total_sent > p2m_size * max_factor  (3: "never send more than 3x")

relocd keeps the numbers and differs in two places, on purpose:

* the dirty threshold looks at the pages dirty *now* (what stop-and-copy would
  send), where libxc looked at what the round just sent (dirtied one round
  earlier);
* "total sent" counts bytes on the wire against ``max_factor`` x memory bytes,
  so zero pages (sent as bare pfns) barely count.

libxc's third rule, "this round sent more than the last while already at the
maximum rate", belongs to its adaptive rate control, which relocd does not
have; DowntimePolicy's ``no-progress`` rule plays its part.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from relocd.errors import ConfigError
from relocd.units import PAGE_SIZE

#: Stop reasons (short, shown to the operator and in the migration result).
MAX_ITERATIONS = "max-iterations"
MAX_FACTOR = "max-factor"
DIRTY_THRESHOLD = "dirty-threshold"
DOWNTIME = "downtime"
NO_PROGRESS = "no-progress"

DEFAULT_MAX_ITERATIONS = 29
DEFAULT_MAX_FACTOR = 3
DEFAULT_DIRTY_THRESHOLD = 50
#: aim low, not at QEMU's 300 ms: at loopback or 10 GbE speeds 20 ms is a few
#: thousand dirty pages, reached in a handful of rounds (docs/operations.md)
DEFAULT_DOWNTIME_MS = 20
#: what a stop costs beyond its pages (vCPU state, journal writes, renames,
#: the GO round trip, the resume), measured at 5-8 ms on this project's
#: machines; the downtime policy budgets the pages with what is left
DEFAULT_HANDOFF_MS = 6.0


@dataclass(frozen=True)
class RoundStats:
    """What one precopy round did, and where it left the guest."""

    round: int  # 1-based
    pages_sent: int  # this round
    bytes_sent: int  # this round, on the wire
    total_bytes_sent: int  # all rounds so far
    duration_s: float  # this round
    dirty_pages: int  # dirty now: what the next round (or stop-and-copy) would send
    memory_pages: int  # size of the guest


class PrecopyPolicy(Protocol):
    def should_stop(self, stats: RoundStats) -> str | None:
        """None to run another round, else why to stop (one of the reasons above)."""
        ...

    def expected_downtime_ms(self, stats: RoundStats) -> float | None:
        """How long stopping after this round would pause the guest; None if not yet known."""
        ...


class BandwidthEstimator:
    """Send bandwidth as an exponentially weighted average of per-round rates.

    Rounds of under ``min_duration_s`` (timer noise) or with nothing sent are
    not measured.  The first measured round sets the estimate; each later one
    moves it by ``alpha`` towards its own rate, so one slow round (a stall on
    the link) does not halve the estimate at once.
    """

    def __init__(self, alpha: float = 0.5, min_duration_s: float = 0.001) -> None:
        if not 0 < alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")
        self.alpha = alpha
        self.min_duration_s = min_duration_s
        self._estimate: float | None = None

    def update(self, nbytes: int, seconds: float) -> None:
        if nbytes <= 0 or seconds < self.min_duration_s:
            return
        rate = nbytes / seconds
        if self._estimate is None:
            self._estimate = rate
        else:
            self._estimate += self.alpha * (rate - self._estimate)

    @property
    def bytes_per_second(self) -> float | None:
        """The estimate; None until a round has been measured."""
        return self._estimate

    def seconds_for(self, nbytes: int) -> float | None:
        """How long ``nbytes`` would take at the estimated rate; None if unknown."""
        if self._estimate is None:
            return None
        return nbytes / self._estimate


class XendPolicy:
    """xend's stop rules: a round budget, a traffic budget, a small dirty set.

    It measures bandwidth too, only to report the expected downtime.
    """

    def __init__(
        self,
        max_iterations: int = DEFAULT_MAX_ITERATIONS,
        max_factor: float = DEFAULT_MAX_FACTOR,
        dirty_threshold: int = DEFAULT_DIRTY_THRESHOLD,
        *,
        estimator: BandwidthEstimator | None = None,
    ) -> None:
        if max_iterations < 1:
            raise ConfigError("max iterations must be at least 1")
        if max_factor <= 0:
            raise ConfigError("max factor must be positive")
        if dirty_threshold < 0:
            raise ConfigError("dirty threshold must not be negative")
        self.max_iterations = max_iterations
        self.max_factor = max_factor
        self.dirty_threshold = dirty_threshold
        self.bandwidth = estimator if estimator is not None else BandwidthEstimator()
        self._last_round = 0

    def _observe(self, stats: RoundStats) -> None:
        """Fold a round into the measurements, once however often it is shown."""
        if stats.round <= self._last_round:
            return
        self._last_round = stats.round
        self.bandwidth.update(stats.bytes_sent, stats.duration_s)

    def expected_downtime_ms(self, stats: RoundStats) -> float | None:
        self._observe(stats)
        seconds = self.bandwidth.seconds_for(stats.dirty_pages * PAGE_SIZE)
        return None if seconds is None else seconds * 1000

    def should_stop(self, stats: RoundStats) -> str | None:
        self._observe(stats)
        return self._xend_reason(stats)

    def _xend_reason(self, stats: RoundStats) -> str | None:
        # Most telling reason first: a small dirty set is the good outcome.
        if stats.dirty_pages < self.dirty_threshold:
            return DIRTY_THRESHOLD
        if stats.total_bytes_sent > self.max_factor * stats.memory_pages * PAGE_SIZE:
            return MAX_FACTOR
        if stats.round >= self.max_iterations:
            return MAX_ITERATIONS
        return None


class DowntimePolicy(XendPolicy):
    """Stop as soon as the dirty set fits the downtime target; xend's rules as a net.

    After each round, in this order:

    1. ``dirty-threshold``: fewer than ``dirty_threshold`` pages dirty.
    2. ``downtime``: sending the dirty pages (``dirty_pages * PAGE_SIZE`` bytes,
       an upper bound as zero pages are cheaper) at the estimated bandwidth,
       plus ``handoff_ms`` for the rest of the stop (vCPU state, the
       handoff's journal writes and round trips, the resume; at most half
       the target), takes at most ``downtime_ms``.
    3. ``no-progress``: the dirty set has not shrunk by at least
       ``min_shrink`` (10%) below its smallest size so far for
       ``stall_rounds`` (3) rounds in a row, *and* the expected downtime is
       within ``stall_bound`` (10) x the target.  A guest whose hot set
       stays bigger than the target allows would otherwise burn rounds until
       the traffic budget ran out, each one resending the same pages; past
       10x the target we keep trying in case the workload calms down.
    4. ``max-factor`` and ``max-iterations`` as in XendPolicy (the net for
       a guest that dirties memory faster than the link can carry it).

    The bandwidth estimate is taken from each round's ``bytes_sent`` and
    ``duration_s``; ``should_stop`` and ``expected_downtime_ms`` fold a round
    in once, whichever is called first.
    """

    def __init__(
        self,
        downtime_ms: float = DEFAULT_DOWNTIME_MS,
        max_iterations: int = DEFAULT_MAX_ITERATIONS,
        max_factor: float = DEFAULT_MAX_FACTOR,
        dirty_threshold: int = DEFAULT_DIRTY_THRESHOLD,
        *,
        stall_rounds: int = 3,
        min_shrink: float = 0.1,
        stall_bound: float = 10.0,
        estimator: BandwidthEstimator | None = None,
        handoff_ms: float = DEFAULT_HANDOFF_MS,
    ) -> None:
        super().__init__(max_iterations, max_factor, dirty_threshold, estimator=estimator)
        if downtime_ms <= 0:
            raise ConfigError("downtime target must be positive")
        self.downtime_ms = downtime_ms
        self.handoff_ms = handoff_ms
        self.stall_rounds = stall_rounds
        self.min_shrink = min_shrink
        self.stall_bound = stall_bound
        self._smallest_dirty: int | None = None
        self._rounds_without_progress = 0

    def _observe(self, stats: RoundStats) -> None:
        if stats.round <= self._last_round:
            return
        super()._observe(stats)
        smallest = self._smallest_dirty
        if smallest is None or stats.dirty_pages < smallest * (1 - self.min_shrink):
            self._smallest_dirty = stats.dirty_pages
            self._rounds_without_progress = 0
        else:
            self._rounds_without_progress += 1

    def expected_downtime_ms(self, stats: RoundStats) -> float | None:
        pages = super().expected_downtime_ms(stats)
        return None if pages is None else pages + min(self.handoff_ms, self.downtime_ms / 2)

    def should_stop(self, stats: RoundStats) -> str | None:
        expected = self.expected_downtime_ms(stats)  # observes the round
        if stats.dirty_pages < self.dirty_threshold:
            return DIRTY_THRESHOLD
        if expected is not None:
            if expected <= self.downtime_ms:
                return DOWNTIME
            if (
                self._rounds_without_progress >= self.stall_rounds
                and expected <= self.stall_bound * self.downtime_ms
            ):
                return NO_PROGRESS
        return self._xend_reason(stats)


def make_policy(
    name: str,
    *,
    downtime_ms: float = DEFAULT_DOWNTIME_MS,
    max_iterations: int = DEFAULT_MAX_ITERATIONS,
    max_factor: float = DEFAULT_MAX_FACTOR,
    dirty_threshold: int = DEFAULT_DIRTY_THRESHOLD,
) -> PrecopyPolicy:
    """A fresh policy for one migration: ``xend`` or ``downtime``."""
    if name == "xend":
        return XendPolicy(max_iterations, max_factor, dirty_threshold)
    if name == "downtime":
        return DowntimePolicy(downtime_ms, max_iterations, max_factor, dirty_threshold)
    raise ConfigError(f"unknown precopy policy {name!r} (choose xend or downtime)")


class RateLimiter:
    """Token bucket for ``relocd-max-bandwidth``; the caller does the waiting.

    ``delay_for(n)`` takes ``n`` bytes from the bucket and says how long to
    sleep before sending them, so asyncio code does
    ``await asyncio.sleep(limiter.delay_for(n))`` and nothing here blocks.
    The bucket may go into debt: a batch bigger than the burst is allowed
    after a proportional wait, and the debt delays whatever follows.
    """

    def __init__(
        self,
        bytes_per_second: int | None,
        clock: Callable[[], float] = time.monotonic,
        *,
        burst_bytes: int | None = None,
    ) -> None:
        if bytes_per_second is not None and bytes_per_second <= 0:
            raise ConfigError("bandwidth limit must be positive")
        self.bytes_per_second = bytes_per_second
        self._clock = clock
        if burst_bytes is None:
            # A tenth of a second of traffic, and at least a 4 MiB batch.
            burst_bytes = max((bytes_per_second or 0) // 10, 4 << 20)
        self.burst_bytes = burst_bytes
        self._tokens = float(burst_bytes)
        self._last = clock()

    def delay_for(self, nbytes: int) -> float:
        """Seconds to wait before sending ``nbytes`` (0.0 when unlimited)."""
        rate = self.bytes_per_second
        if rate is None:
            return 0.0
        now = self._clock()
        self._tokens = min(float(self.burst_bytes), self._tokens + (now - self._last) * rate)
        self._last = now
        self._tokens -= nbytes
        return 0.0 if self._tokens >= 0 else -self._tokens / rate
