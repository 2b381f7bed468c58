"""Operators' control of a migration in flight (issue 12), engine side, with the sim driver.

abort before GO (and its refusal after), migrate-set, --timeout both ways,
the overshoot warning, and progress inside a round.  Races are held at the
exact await by channels that wait on an event, never by sleeping.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from relocd.drivers.base import DomainConfig, DomainState
from relocd.engine.meter import RoundMeter
from relocd.engine.policy import DowntimePolicy, XendPolicy
from relocd.engine.source import TIMEOUT_STOP, SendOptions, SourceMigration, new_migration_id
from relocd.engine.stream import RecordChannel, memory_pipe
from relocd.engine.target import TargetSession
from relocd.errors import ConfigError, DomainBusy, DriverError
from relocd.protocol.records import Abort, EndRound, Go, Prepared, Record, Role
from relocd.protocol.state import Conversation
from relocd.units import PAGE_SIZE
from tests.unit.test_engine import Host, hosts  # noqa: F401  (the two sim hosts and their fixture)


class HeldChannel(RecordChannel):
    """The source's channel: the first record of type ``hold`` waits until ``release`` is set."""

    def __init__(self, *args: Any, hold: type[Record], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hold = hold
        self.reached = asyncio.Event()
        self.release = asyncio.Event()
        self.sent: list[Record] = []

    async def send(self, record: Record) -> None:
        if isinstance(record, self.hold) and not self.reached.is_set():
            self.reached.set()
            await self.release.wait()
        self.sent.append(record)
        await super().send(record)


def start(a: Host, b: Host, name: str, options: SendOptions, hold: type[Record] = Go,
          progress: Any = None) -> tuple[SourceMigration, HeldChannel, asyncio.Future[Any], asyncio.Future[None]]:  # fmt: skip
    src_t, dst_t = memory_pipe()
    src = HeldChannel(src_t, Conversation(Role.SOURCE), max_frame=16 << 20, hold=hold)
    dst = RecordChannel(dst_t, Conversation(Role.TARGET), max_frame=16 << 20)
    dom = a.driver.lookup(name)
    assert dom is not None
    kw: dict[str, Any] = {} if progress is None else {"progress": progress}
    mig = SourceMigration(dom, src, options, journal=a.journal, migration_id=new_migration_id(), target="b", **kw)
    task = asyncio.ensure_future(mig.run())
    session = asyncio.ensure_future(TargetSession(dst, b.ctx, peer="a").run())
    return mig, src, task, session


async def test_abort_before_go_leaves_the_domain_running_and_the_target_empty(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    await a.driver.create(DomainConfig(name="vm", memory_mib=16, workload="uniform:rate=20MB/s"))
    mig, src, task, session = start(a, b, "vm", SendOptions(live=True, verify=False, policy=XendPolicy(4, 3, 0)),
                                    hold=EndRound)  # fmt: skip
    await asyncio.wait_for(src.reached.wait(), 10)  # held mid-precopy, at the first END_ROUND
    mig.request_abort("cancelled by the operator")
    result = await asyncio.wait_for(task, 10)
    await asyncio.wait_for(session, 10)
    assert result.status == "cancelled" and result.error == "cancelled by the operator"
    assert [(d.name, d.state) for d in a.driver.domains()] == [("vm", DomainState.RUNNING)]
    assert b.driver.domains() == [] and b.ctx.reservations.all() == []
    assert any(isinstance(r, Abort) for r in src.sent), "the target was not told"
    assert a.journal.get(mig.mid).outcome == "rolled-back"  # type: ignore[union-attr]


async def test_abort_after_go_is_refused_and_the_move_completes(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    await a.driver.create(DomainConfig(name="vm", memory_mib=8))
    mig, src, task, session = start(a, b, "vm", SendOptions(live=False, verify=False, policy=XendPolicy()), hold=Go)
    await asyncio.wait_for(src.reached.wait(), 10)  # the handoff began: GO is about to go out
    with pytest.raises(DomainBusy, match="past GO"):
        mig.request_abort()
    src.release.set()
    result = await asyncio.wait_for(task, 10)
    await asyncio.wait_for(session, 10)
    assert result.status == "completed"
    assert [d.name for d in b.driver.domains()] == ["vm"] and a.driver.domains() == []


async def test_abort_while_the_target_prepares(hosts: tuple[Host, Host]) -> None:
    """Abort when COMMIT is out and PREPARED not yet acted on: the target drops its prepared copy."""
    a, b = hosts
    await a.driver.create(DomainConfig(name="vm", memory_mib=8))
    src_t, dst_t = memory_pipe()

    class HoldPrepared(RecordChannel):
        reached = asyncio.Event()
        release = asyncio.Event()

        async def recv(self) -> Any:
            record = await super().recv()
            if isinstance(record, Prepared):
                self.reached.set()
                await self.release.wait()
            return record

    src = HoldPrepared(src_t, Conversation(Role.SOURCE), max_frame=16 << 20)
    dst = RecordChannel(dst_t, Conversation(Role.TARGET), max_frame=16 << 20)
    dom = a.driver.lookup("vm")
    assert dom is not None
    mig = SourceMigration(dom, src, SendOptions(live=False, verify=False, policy=XendPolicy()),
                          journal=a.journal, migration_id=new_migration_id(), target="b")  # fmt: skip
    task = asyncio.ensure_future(mig.run())
    session = asyncio.ensure_future(TargetSession(dst, b.ctx, peer="a").run())
    await asyncio.wait_for(HoldPrepared.reached.wait(), 10)
    assert [d.name for d in b.driver.domains()] == ["vm--incoming"]
    mig.request_abort()
    result = await asyncio.wait_for(task, 10)
    await asyncio.wait_for(session, 10)
    assert result.status == "cancelled"
    assert [(d.name, d.state) for d in a.driver.domains()] == [("vm", DomainState.RUNNING)]
    assert b.driver.domains() == [] and b.ctx.in_doubt == {} and b.ctx.reservations.all() == []


async def test_migrate_set_changes_the_next_round(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    await a.driver.create(DomainConfig(name="vm", memory_mib=16))
    policy = DowntimePolicy(50)
    mig, src, task, session = start(a, b, "vm", SendOptions(live=True, verify=False, policy=policy), hold=EndRound)
    await asyncio.wait_for(src.reached.wait(), 10)
    mig.set_limits(downtime_ms=500, max_bandwidth=1 << 30)
    assert policy.downtime_ms == 500 and mig.limiter.bytes_per_second == 1 << 30
    src.release.set()
    result = await asyncio.wait_for(task, 20)
    await asyncio.wait_for(session, 10)
    assert result.status == "completed" and result.downtime_target_ms == 500


async def test_migrate_set_downtime_needs_the_downtime_policy(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    dom = await a.driver.create(DomainConfig(name="vm", memory_mib=8))
    src_t, _ = memory_pipe()
    mig = SourceMigration(dom, RecordChannel(src_t, Conversation(Role.SOURCE), max_frame=1 << 20),
                          SendOptions(live=True, verify=False, policy=XendPolicy()),
                          journal=a.journal, migration_id=new_migration_id(), target="b")  # fmt: skip
    with pytest.raises(ConfigError, match="no downtime target"):
        mig.set_limits(downtime_ms=100)


async def test_timeout_abort_rolls_back_a_migration_that_does_not_converge(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    await a.driver.create(DomainConfig(name="vm", memory_mib=16, workload="uniform:rate=200MB/s"))
    never = XendPolicy(max_iterations=10_000, max_factor=10_000, dirty_threshold=0)
    opts = SendOptions(live=True, verify=False, policy=never, timeout_s=0.0)
    mig, src, task, session = start(a, b, "vm", opts, hold=Go)
    result = await asyncio.wait_for(task, 20)
    await asyncio.wait_for(session, 10)
    assert result.status == "rolled-back" and "did not converge within 0 s" in (result.error or "")
    assert [(d.name, d.state) for d in a.driver.domains()] == [("vm", DomainState.RUNNING)]
    assert b.driver.domains() == []


async def test_timeout_stop_forces_the_stop_and_copy(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    await a.driver.create(DomainConfig(name="vm", memory_mib=16, workload="uniform:rate=200MB/s"))
    never = XendPolicy(max_iterations=10_000, max_factor=10_000, dirty_threshold=0)
    opts = SendOptions(live=True, verify=False, policy=never, timeout_s=0.0, timeout_action=TIMEOUT_STOP)
    mig, src, task, session = start(a, b, "vm", opts, hold=Go)
    await asyncio.wait_for(src.reached.wait(), 20)
    src.release.set()
    result = await asyncio.wait_for(task, 20)
    await asyncio.wait_for(session, 10)
    assert result.status == "completed" and result.stop_reason == "timeout" and result.iterations == 2


async def test_overshoot_is_warned_about(hosts: tuple[Host, Host]) -> None:
    """A stop-and-copy predicted to take over 2x the downtime target: the result says so."""
    a, b = hosts
    await a.driver.create(DomainConfig(name="vm", memory_mib=16, workload="uniform:rate=400MB/s"))
    policy = DowntimePolicy(0.001, max_iterations=2)  # a target no stop-and-copy can meet
    mig, src, task, session = start(a, b, "vm", SendOptions(live=True, verify=False, policy=policy), hold=Go)
    await asyncio.wait_for(src.reached.wait(), 20)
    src.release.set()
    result = await asyncio.wait_for(task, 20)
    await asyncio.wait_for(session, 10)
    assert result.status == "completed"
    assert result.downtime_target_ms == 0.001 and "downtime target" in (result.downtime_warning or "")


async def test_progress_inside_a_round(hosts: tuple[Host, Host]) -> None:
    """Round 1 of a guest reports while it runs, not only at its end: bytes, percent, ETA."""
    a, b = hosts
    await a.driver.create(DomainConfig(name="vm", memory_mib=64))
    events: list[dict[str, Any]] = []

    async def progress(**fields: Any) -> None:
        events.append(fields)

    # 1 MiB batches at 40 MiB/s: round 1 takes ~1.6 s, so several 250 ms events fall inside it
    opts = SendOptions(live=True, verify=False, policy=XendPolicy(2, 3, 10**9), batch_pages=256,
                       max_bandwidth=40 << 20)  # fmt: skip
    mig, src, task, session = start(a, b, "vm", opts, hold=Go, progress=progress)
    await asyncio.wait_for(src.reached.wait(), 30)
    src.release.set()
    await asyncio.wait_for(task, 30)
    await asyncio.wait_for(session, 10)
    inside = [e for e in events if e.get("round") == 1 and "percent" in e]
    assert len(inside) >= 3, events
    assert all(e["round_bytes_total"] == 64 * 256 * PAGE_SIZE for e in inside)
    percents = [e["percent"] for e in inside]
    etas = [e["eta_s"] for e in inside if e["eta_s"] is not None]
    assert percents == sorted(percents) and 0 < percents[0] < 100
    assert etas == sorted(etas, reverse=True), "the ETA ran backwards within the round"


def test_meter_never_runs_backwards() -> None:
    now = [0.0]
    meter = RoundMeter(1, 100, 0, clock=lambda: now[0])
    meter.add(10, 10 * PAGE_SIZE)  # the first batch leaves at once (a burst): no rate from it
    assert meter.event()["eta_s"] is None
    now[0] = 1.0
    meter.add(40, 40 * PAGE_SIZE)  # 40 pages/s since the first batch
    first = meter.event()
    assert first["percent"] == 50.0 and first["eta_s"] == 1.25 and first["bandwidth"] == 40 * PAGE_SIZE
    now[0] = 10.0  # a slow stretch: the rate estimate drops, the ETA must not grow
    meter.add(10, 10 * PAGE_SIZE)
    second = meter.event()
    assert second["percent"] == 60.0 and second["eta_s"] == 1.25
    assert second["bytes_remaining"] == 40 * PAGE_SIZE and second["bytes_total"] == 100 * PAGE_SIZE
    assert not meter.due()
    now[0] = 10.3
    assert meter.due()


def test_meter_is_not_fooled_by_a_first_burst() -> None:
    """Under a bandwidth cap the first batch goes at once, then 1 batch a second: the ETA says so."""
    now = [0.0]
    meter = RoundMeter(1, 1000, 0, clock=lambda: now[0])
    meter.add(100, 100 * PAGE_SIZE)  # burst
    for _ in range(4):
        now[0] += 1.0
        meter.add(100, 100 * PAGE_SIZE)
    event = meter.event()
    assert event["eta_s"] == 5.0  # 500 pages left at 100 pages/s (not ~0, as the burst would say)
