"""Precopy stop policies on synthetic migrations, and the rate limiter."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from relocd.engine.policy import (
    DEFAULT_DOWNTIME_MS,
    DEFAULT_HANDOFF_MS,
    DIRTY_THRESHOLD,
    DOWNTIME,
    MAX_FACTOR,
    MAX_ITERATIONS,
    NO_PROGRESS,
    BandwidthEstimator,
    DowntimePolicy,
    PrecopyPolicy,
    RateLimiter,
    RoundStats,
    XendPolicy,
    make_policy,
)
from relocd.errors import ConfigError
from relocd.units import PAGE_SIZE

GUEST_PAGES = 1 << 18  # 1 GiB
LINK = 1_000_000_000  # bytes per second


def simulate(
    policy: PrecopyPolicy,
    dirty_after: Callable[[int, float], int],
    *,
    npages: int = GUEST_PAGES,
    bandwidth: float = LINK,
    max_rounds: int = 100,
) -> tuple[str, list[RoundStats]]:
    """Run precopy rounds until the policy stops; dirty_after(round, seconds) -> dirty pages."""
    rounds: list[RoundStats] = []
    to_send = npages
    total = 0
    for rnd in range(1, max_rounds + 1):
        nbytes = to_send * PAGE_SIZE
        seconds = nbytes / bandwidth
        total += nbytes
        dirty = min(npages, dirty_after(rnd, seconds))
        stats = RoundStats(
            round=rnd,
            pages_sent=to_send,
            bytes_sent=nbytes,
            total_bytes_sent=total,
            duration_s=seconds,
            dirty_pages=dirty,
            memory_pages=npages,
        )
        rounds.append(stats)
        reason = policy.should_stop(stats)
        if reason is not None:
            return reason, rounds
        to_send = dirty
    raise AssertionError("policy never stopped")


def hotset(pages: int) -> Callable[[int, float], int]:
    return lambda rnd, seconds: pages


def idle(rnd: int, seconds: float) -> int:
    return 0


def sweep(rnd: int, seconds: float) -> int:
    return GUEST_PAGES


def rate(pages_per_second: float) -> Callable[[int, float], int]:
    return lambda rnd, seconds: int(pages_per_second * seconds)


# -- xend -----------------------------------------------------------------------


def test_xend_idle_guest_stops_after_first_round() -> None:
    reason, rounds = simulate(XendPolicy(), idle)
    assert (reason, len(rounds)) == (DIRTY_THRESHOLD, 1)


def test_xend_hotset_never_under_threshold_runs_all_iterations() -> None:
    reason, rounds = simulate(XendPolicy(), hotset(1000))
    assert (reason, len(rounds)) == (MAX_ITERATIONS, 29)


def test_xend_sweep_stops_on_traffic_budget() -> None:
    # Every round resends all memory: after round 3 exactly 3x is sent (not
    # more), round 4 goes over.
    reason, rounds = simulate(XendPolicy(), sweep)
    assert (reason, len(rounds)) == (MAX_FACTOR, 4)


def test_xend_converging_guest_stops_under_threshold() -> None:
    # Dirties 20k pages/s: each round is ~8% of the previous one.
    reason, rounds = simulate(XendPolicy(), rate(20_000))
    assert reason == DIRTY_THRESHOLD
    assert rounds[-1].dirty_pages < 50 <= rounds[-2].dirty_pages


@pytest.mark.parametrize("dirty, stops", [(49, True), (50, False)])
def test_xend_threshold_is_strict(dirty: int, stops: bool) -> None:
    stats = RoundStats(2, 100, 100 * PAGE_SIZE, GUEST_PAGES * PAGE_SIZE, 0.1, dirty, GUEST_PAGES)
    assert (XendPolicy().should_stop(stats) == DIRTY_THRESHOLD) is stops


def test_xend_custom_bounds() -> None:
    reason, rounds = simulate(XendPolicy(max_iterations=5), hotset(1000))
    assert (reason, len(rounds)) == (MAX_ITERATIONS, 5)
    reason, rounds = simulate(XendPolicy(dirty_threshold=2000), hotset(1000))
    assert (reason, len(rounds)) == (DIRTY_THRESHOLD, 1)


def test_xend_reports_expected_downtime() -> None:
    policy = XendPolicy()
    stats = RoundStats(1, 1000, 8_000_000, 8_000_000, 0.008, 250, 1000)
    assert policy.expected_downtime_ms(stats) == pytest.approx(250 * PAGE_SIZE / 1e9 * 1000)


def test_bad_bounds_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        XendPolicy(max_iterations=0)
    with pytest.raises(ConfigError):
        XendPolicy(max_factor=0)
    with pytest.raises(ConfigError):
        DowntimePolicy(downtime_ms=0)


# -- downtime -------------------------------------------------------------------


def test_downtime_small_hotset_stops_as_soon_as_it_fits() -> None:
    # 1000 pages at 1 GB/s is ~4 ms: well under 300 ms after round 1.
    policy = DowntimePolicy(downtime_ms=300)
    reason, rounds = simulate(policy, hotset(1000))
    assert (reason, len(rounds)) == (DOWNTIME, 1)
    expected = policy.expected_downtime_ms(rounds[-1])
    # the pages at the measured bandwidth, plus the stop's fixed part
    assert expected == pytest.approx(1000 * PAGE_SIZE / LINK * 1000 + DEFAULT_HANDOFF_MS)


def test_the_fixed_part_of_a_stop_is_budgeted_at_most_half_the_target() -> None:
    # 1000 pages at 1 GB/s is ~4.1 ms of pages; the handoff adds 6 ms, or half a smaller target.
    assert simulate(DowntimePolicy(downtime_ms=12), hotset(1000))[0] == DOWNTIME
    tight = DowntimePolicy(downtime_ms=10)
    assert tight.expected_downtime_ms(simulate(tight, hotset(1000))[1][0]) == pytest.approx(4.096 + 5)
    assert DowntimePolicy(downtime_ms=4).expected_downtime_ms(simulate(DowntimePolicy(downtime_ms=4), hotset(1000))[1][0]) == pytest.approx(4.096 + 2)
    assert DEFAULT_DOWNTIME_MS == 20


def test_downtime_hotset_above_target_stops_when_not_shrinking() -> None:
    # 16384 pages (64 MiB) take ~67 ms: over a 30 ms target, under 10x it.
    # Round 1 sets the smallest dirty set; rounds 2, 3, 4 do not improve it.
    reason, rounds = simulate(DowntimePolicy(downtime_ms=30), hotset(16384))
    assert (reason, len(rounds)) == (NO_PROGRESS, 4)


def test_downtime_hotset_far_above_target_falls_back_to_xend_bounds() -> None:
    # 100k pages take ~410 ms, >10x a 30 ms target: keep going (the workload
    # may calm down) until 3x memory has been sent.
    reason, rounds = simulate(DowntimePolicy(downtime_ms=30), hotset(100_000))
    assert (reason, len(rounds)) == (MAX_FACTOR, 7)


def test_downtime_hotset_far_above_target_with_high_factor_hits_iterations() -> None:
    policy = DowntimePolicy(downtime_ms=30, max_factor=1000)
    reason, rounds = simulate(policy, hotset(100_000))
    assert (reason, len(rounds)) == (MAX_ITERATIONS, 29)


def test_downtime_slowly_shrinking_dirty_set_is_progress() -> None:
    # Shrinks 8% a round: a new 10% low every other round, never 3 flat rounds.
    sizes = {1: 50_000}

    def shrinking(rnd: int, seconds: float) -> int:
        sizes[rnd + 1] = int(sizes[rnd] * 0.92)
        return sizes[rnd]

    reason, rounds = simulate(DowntimePolicy(downtime_ms=30, max_factor=1000), shrinking)
    assert reason == DOWNTIME
    assert len(rounds) > 10
    assert rounds[-1].dirty_pages * PAGE_SIZE / LINK * 1000 <= 30


def test_downtime_sweep_hits_traffic_budget() -> None:
    reason, rounds = simulate(DowntimePolicy(downtime_ms=30), sweep)
    assert (reason, len(rounds)) == (MAX_FACTOR, 4)


def test_downtime_dirty_threshold_beats_downtime() -> None:
    reason, _ = simulate(DowntimePolicy(downtime_ms=300), idle)
    assert reason == DIRTY_THRESHOLD


def test_downtime_slow_link_keeps_iterating() -> None:
    # 10 MB/s: 1000 pages take ~410 ms > 300 ms; not shrinking, and within
    # 10x, so no-progress after 3 flat rounds.
    reason, rounds = simulate(DowntimePolicy(downtime_ms=300), hotset(1000), bandwidth=10e6)
    assert (reason, len(rounds)) == (NO_PROGRESS, 4)


def test_unmeasured_rounds_give_no_estimate() -> None:
    policy = DowntimePolicy(downtime_ms=300)
    stats = RoundStats(1, 10, 10 * PAGE_SIZE, 10 * PAGE_SIZE, 0.0, 5000, GUEST_PAGES)
    assert policy.expected_downtime_ms(stats) is None
    assert policy.should_stop(stats) is None


def test_showing_the_estimate_does_not_count_a_round_twice() -> None:
    shown = DowntimePolicy(downtime_ms=30)
    plain = DowntimePolicy(downtime_ms=30)
    for rnd in range(1, 4):
        stats = RoundStats(
            rnd, 16384, 16384 * PAGE_SIZE, rnd * 16384 * PAGE_SIZE, 0.067, 16384, GUEST_PAGES
        )
        for _ in range(5):
            shown.expected_downtime_ms(stats)
        assert shown.should_stop(stats) == plain.should_stop(stats) is None


def test_bandwidth_estimator_ewma() -> None:
    est = BandwidthEstimator(alpha=0.5)
    assert est.bytes_per_second is None and est.seconds_for(100) is None
    est.update(1000, 1.0)
    assert est.bytes_per_second == 1000
    est.update(3000, 1.0)
    assert est.bytes_per_second == 2000
    est.update(0, 1.0)  # nothing sent: not a measurement
    est.update(5000, 0.0)  # no time: not a measurement
    assert est.bytes_per_second == 2000
    assert est.seconds_for(4000) == 2.0


def test_make_policy() -> None:
    assert isinstance(make_policy("xend", max_iterations=3), XendPolicy)
    policy = make_policy("downtime", downtime_ms=50)
    assert isinstance(policy, DowntimePolicy) and policy.downtime_ms == 50
    with pytest.raises(ConfigError, match="unknown precopy policy"):
        make_policy("fastest")


# -- rate limiter ---------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_unlimited_never_waits() -> None:
    limiter = RateLimiter(None)
    assert all(limiter.delay_for(1 << 30) == 0.0 for _ in range(10))


def test_limiter_holds_the_average_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(10_000_000, clock, burst_bytes=1_000_000)
    waited = 0.0
    for _ in range(100):  # 100 MB at 10 MB/s
        delay = limiter.delay_for(1_000_000)
        assert delay >= 0
        waited += delay
        clock.now += delay
    # The first MB rides the burst; the other 99 take 0.1 s each.
    assert waited == pytest.approx(9.9)


def test_limiter_refills_while_idle_up_to_the_burst() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1_000_000, clock, burst_bytes=500_000)
    assert limiter.delay_for(500_000) == 0.0
    assert limiter.delay_for(100_000) == pytest.approx(0.1)
    clock.now += 60  # idle a minute: the bucket holds only the burst
    assert limiter.delay_for(500_000) == 0.0
    assert limiter.delay_for(1_000_000) == pytest.approx(1.0)


def test_limiter_refuses_nonsense_rate() -> None:
    with pytest.raises(ConfigError):
        RateLimiter(0)
