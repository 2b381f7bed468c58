"""The engine's stream path (drivers whose hypervisor moves memory itself, e.g. Xen PV),
with a fake stream driver: relocd's policy decides the rounds, chunks ride in STREAM records,
the target's driver builds the domain from them, and the handoff is the usual one."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from relocd.drivers.base import Domain, DomainConfig, DomainState
from relocd.engine.journal import Journal, Phase
from relocd.engine.policy import DowntimePolicy
from relocd.engine.reservation import ReservationTable
from relocd.engine.source import SendOptions, SourceMigration, new_migration_id
from relocd.engine.stream import RecordChannel, memory_pipe
from relocd.engine.target import TargetContext, TargetSession
from relocd.protocol.records import Role
from relocd.protocol.state import Conversation
from tests.unit.fakestream import StreamDriver


class Host:
    def __init__(self, root: Path, name: str) -> None:
        (root / name).mkdir()
        self.driver = StreamDriver(state_dir=root / name)
        self.journal = Journal(root / name / "journal.sqlite")
        self.ctx = TargetContext(
            drivers={"fakestream": self.driver}, reservations=ReservationTable(30), journal=self.journal
        )


async def move(a: Host, b: Host, dom: Domain, *, live: bool) -> Any:
    src_t, dst_t = memory_pipe()
    src = RecordChannel(src_t, Conversation(Role.SOURCE), max_frame=16 << 20)
    dst = RecordChannel(dst_t, Conversation(Role.TARGET), max_frame=16 << 20)
    mig = SourceMigration(
        dom, src, SendOptions(live=live, verify=False, policy=DowntimePolicy(50)),
        journal=a.journal, migration_id=new_migration_id(), target="b",
    )  # fmt: skip
    result, _ = await asyncio.gather(mig.run(), TargetSession(dst, b.ctx, peer="a").run())
    return result


@pytest.mark.parametrize("live", [True, False], ids=["live", "non-live"])
async def test_stream_domain_moves_with_relocd_deciding_the_rounds(tmp_path: Path, live: bool) -> None:
    a, b = Host(tmp_path, "a"), Host(tmp_path, "b")
    dom = await a.driver.create(DomainConfig(name="pv", memory_mib=1, driver="fakestream"))
    image = bytes(dom.image)  # type: ignore[attr-defined]
    result = await move(a, b, dom, live=live)
    assert result.status == "completed", result.error
    assert a.driver.domains() == [], "the source copy is destroyed after RESUMED"
    [moved] = b.driver.domains()
    assert moved.name == "pv" and moved.state == DomainState.RUNNING
    assert bytes(moved.image) == image  # type: ignore[attr-defined]
    if live:
        assert result.iterations >= 2 and result.rounds and result.stop_reason is not None
    assert a.journal.get(result.migration_id).phase == Phase.DONE  # type: ignore[union-attr]


async def test_a_failed_build_on_the_target_resumes_the_source(tmp_path: Path) -> None:
    a, b = Host(tmp_path, "a"), Host(tmp_path, "b")
    b.driver.fail_build = True
    dom = await a.driver.create(DomainConfig(name="pv", memory_mib=1, driver="fakestream"))
    result = await move(a, b, dom, live=True)
    assert result.status == "rolled-back", result
    assert dom.state == DomainState.RUNNING and not dom.suspended  # type: ignore[attr-defined]
    assert b.driver.domains() == []
    assert b.ctx.reservations.all() == [] and b.ctx.incoming == {}


async def test_a_driver_done_before_the_stream_ends_leaves_no_copy_on_the_target(tmp_path: Path) -> None:
    a, b = Host(tmp_path, "a"), Host(tmp_path, "b")
    b.driver.finish_early = True
    dom = await a.driver.create(DomainConfig(name="pv", memory_mib=1, driver="fakestream"))
    result = await move(a, b, dom, live=True)
    assert result.status == "rolled-back" and "before the stream ended" in (result.error or ""), result
    assert dom.state == DomainState.RUNNING and not dom.suspended  # type: ignore[attr-defined]
    assert b.driver.domains() == [], "the copy the driver built early is destroyed"
    assert b.ctx.reservations.all() == [] and b.ctx.incoming == {}


async def test_two_daemons_on_one_hypervisor(tmp_path: Path) -> None:
    """Both daemons see the same domains (one Xen dom0): the source's own copy is no clash."""
    a, b = Host(tmp_path, "a"), Host(tmp_path, "b")
    b.driver = a.driver
    b.ctx.drivers = {"fakestream": a.driver}
    dom = await a.driver.create(DomainConfig(name="pv", memory_mib=1, driver="fakestream"))
    result = await move(a, b, dom, live=True)
    assert result.status == "completed", result.error
    assert [(d.name, d.state) for d in a.driver.domains()] == [("pv", DomainState.RUNNING)]
    assert a.driver.domains()[0] is not dom and dom.destroyed  # type: ignore[attr-defined]


async def test_a_second_domain_of_that_name_still_clashes(tmp_path: Path) -> None:
    a, b = Host(tmp_path, "a"), Host(tmp_path, "b")
    await b.driver.create(DomainConfig(name="pv", memory_mib=1, driver="fakestream"))
    dom = await a.driver.create(DomainConfig(name="pv", memory_mib=1, driver="fakestream"))
    result = await move(a, b, dom, live=True)
    assert result.status == "failed" and "pv" in (result.error or "")
    assert dom.state == DomainState.RUNNING


async def test_in_doubt_after_restart_resumes_a_suspended_stream_domain_the_drivers_way(tmp_path: Path) -> None:
    """A source restarted after GO finds its stream domain suspended; the target holds no copy:
    the domain must come back with cancel_send() (a Xen guest is suspended, not paused)."""
    a, b = Host(tmp_path, "a"), Host(tmp_path, "b")
    dom = await a.driver.create(DomainConfig(name="pv", memory_mib=1, driver="fakestream"))
    dom.suspended = True  # type: ignore[attr-defined]  # as send_stream left it
    await dom.pause()
    mid = new_migration_id()
    a.journal.begin(mid, "source", "pv", dom.config.uuid, "b", True)
    a.journal.set_phase(mid, Phase.GO_SENT)
    sessions: list[asyncio.Task[Any]] = []

    async def reconnect() -> RecordChannel:
        src_t, dst_t = memory_pipe()
        dst = RecordChannel(dst_t, Conversation(Role.TARGET), max_frame=16 << 20)
        sessions.append(asyncio.ensure_future(TargetSession(dst, b.ctx, peer="a").run()))
        return RecordChannel(src_t, Conversation(Role.QUERY), max_frame=16 << 20)

    mig = SourceMigration.in_doubt(
        dom, "pv", SendOptions(live=True, verify=False, policy=DowntimePolicy(50), recovery_s=10),
        journal=a.journal, migration_id=mid, target="b", reconnect=reconnect,
    )  # fmt: skip
    result = await mig.resolve()
    await asyncio.gather(*sessions, return_exceptions=True)
    assert result.status == "rolled-back", result
    assert dom.state == DomainState.RUNNING and not dom.suspended  # type: ignore[attr-defined]


async def test_a_stream_move_passes_the_fault_points_of_a_page_move(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RELOCD_FAULT's phases (docs/faults.md) exist on the stream path too, so the lab can kill there."""
    from relocd.engine import transfer

    seen: list[tuple[str, str]] = []

    async def record(side: str, phase: str) -> None:
        seen.append((side, phase))

    monkeypatch.setattr(transfer, "fault_point", record)
    a, b = Host(tmp_path, "a"), Host(tmp_path, "b")
    dom = await a.driver.create(DomainConfig(name="pv", memory_mib=1, driver="fakestream"))
    result = await move(a, b, dom, live=True)
    assert result.status == "completed", result.error
    for side in ("source", "target"):
        phases = [phase for s, phase in seen if s == side]
        assert phases[0] == "precopy-1" and phases[-1] == "stop-and-copy", seen
        assert phases[:-1] == [f"precopy-{r}" for r in range(1, len(phases))]
