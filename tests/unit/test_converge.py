"""Auto-converge (engine/converge.py): its rule on its own, and a sim guest that outruns its link."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relocd.drivers.base import DomainConfig, DomainState
from relocd.drivers.sim import SimDriver
from relocd.engine.converge import INITIAL, MAXIMUM, AutoConverge
from relocd.engine.journal import Journal
from relocd.engine.policy import DowntimePolicy, RoundStats
from relocd.engine.source import SendOptions, SourceMigration, new_migration_id
from relocd.engine.stream import RecordChannel, memory_pipe
from relocd.engine.target import TargetContext, TargetSession
from relocd.protocol.records import Role
from relocd.protocol.state import Conversation
from tests.unit.simhosts import sim_pair
from relocd.units import PAGE_SIZE


def stats(round_no: int, sent: int, dirty: int, seconds: float = 1.0) -> RoundStats:
    return RoundStats(round_no, sent, sent * PAGE_SIZE, sent * PAGE_SIZE * round_no, seconds, dirty, 1 << 20)


def test_a_guest_that_keeps_up_is_never_throttled() -> None:
    ac = AutoConverge()
    for r in range(1, 8):
        assert ac.after_round(stats(r, 10_000, 2_000), 80.0, 20.0) is None
    assert ac.throttle == 0.0 and ac.steps == []


def test_two_rounds_that_do_not_shrink_start_the_throttle_aimed_at_half_the_link() -> None:
    ac = AutoConverge()
    assert ac.after_round(stats(1, 262_144, 250_000), 900.0, 20.0) is None  # round 1 never counts
    assert ac.after_round(stats(2, 250_000, 240_000), 900.0, 20.0) is None  # the first high round
    first = ac.after_round(stats(3, 240_000, 240_000), 900.0, 20.0)
    # dirtying as fast as it sends: half the link needs the guest at half speed
    assert first == pytest.approx(0.5)
    assert first is not None and first >= INITIAL
    # still outrunning it (at half speed it dirties 0.9 of what is sent): up again, at least a step
    second = ac.after_round(stats(4, 240_000, 216_000), 900.0, 20.0)
    assert second is not None and second >= first + 0.1 - 1e-9
    assert ac.steps == [(3, first), (4, second)]


def test_the_throttle_stops_at_the_maximum_and_goes_nowhere_when_off() -> None:
    ac = AutoConverge()
    for r in range(2, 30):
        ac.after_round(stats(r, 1000, 1000_000), 9000.0, 20.0)
    assert ac.throttle == MAXIMUM and not ac.may_rise
    off = AutoConverge(enabled=False)
    for r in range(2, 6):
        assert off.after_round(stats(r, 1000, 1000_000), 9000.0, 20.0) is None
    assert not off.may_rise


def test_a_round_that_fits_the_target_resets_the_count() -> None:
    ac = AutoConverge()
    ac.after_round(stats(2, 1000, 900), 100.0, 20.0)
    ac.after_round(stats(3, 1000, 900), 10.0, 20.0)  # fits: the policy stops here anyway
    assert ac.after_round(stats(4, 1000, 900), 100.0, 20.0) is None  # counting starts over


# -- a sim guest dirtying at twice the bandwidth cap ----------------------------------


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[SimDriver, Journal, TargetContext]]:
    async with sim_pair(tmp_path) as (a, b):
        yield a.driver, a.journal, b.ctx


async def move(a: SimDriver, ja: Journal, ctx: TargetContext, *, auto_converge: bool) -> SourceMigration:
    dom = a.lookup("hot")
    assert dom is not None
    s, t = memory_pipe()
    mig = SourceMigration(
        dom,
        RecordChannel(s, Conversation(Role.SOURCE), max_frame=16 << 20),
        SendOptions(live=True, verify=True, policy=DowntimePolicy(20, max_iterations=12),
                    max_bandwidth=8 << 20, batch_pages=256, auto_converge=auto_converge),
        journal=ja,
        migration_id=new_migration_id(),
        target="b",
    )  # fmt: skip
    session = TargetSession(RecordChannel(t, Conversation(Role.TARGET), max_frame=16 << 20), ctx, peer="a")
    await asyncio.gather(mig.run(), session.run())
    return mig


async def test_an_over_dirtying_guest_converges_throttled(pair: tuple[SimDriver, Journal, TargetContext]) -> None:
    a, ja, ctx = pair
    # 16 MiB dirtied at 16 MB/s over an 8 MiB/s link: precopy alone never catches up
    await a.create(DomainConfig(name="hot", memory_mib=16, workload="uniform:rate=16MB/s"))
    await asyncio.sleep(0.3)
    mig = await move(a, ja, ctx, auto_converge=True)
    result = mig.result
    assert result.status == "completed", result.error
    assert result.auto_converge is True and result.throttle_pct >= INITIAL * 100
    assert mig.converge.steps, "the guest was never throttled"
    assert result.stop_reason in ("downtime", "dirty-threshold"), result.stop_reason
    moved = ctx.drivers["sim"].lookup("hot")
    assert moved is not None and moved.state == DomainState.RUNNING
    await moved.pause()
    assert await moved.check_invariant() is None


async def test_without_auto_converge_it_says_why_it_stopped(pair: tuple[SimDriver, Journal, TargetContext]) -> None:
    a, ja, ctx = pair
    await a.create(DomainConfig(name="hot", memory_mib=16, workload="uniform:rate=16MB/s"))
    await asyncio.sleep(0.3)
    mig = await move(a, ja, ctx, auto_converge=False)
    result = mig.result
    assert result.status == "completed", result.error
    assert result.throttle_pct == 0.0 and not mig.converge.steps
    assert result.stop_reason in ("max-factor", "max-iterations", "no-progress"), result.stop_reason
    assert result.downtime_warning is not None  # the overshoot is said, not silent
