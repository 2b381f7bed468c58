"""The engine end to end with the sim driver, over an in-memory pipe (no network)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relocd.drivers.base import DomainConfig, DomainState
from relocd.engine.journal import Phase
from relocd.engine.policy import DowntimePolicy, XendPolicy
from relocd.engine.source import SendOptions, SourceMigration, new_migration_id
from relocd.engine.stream import RecordChannel, memory_pipe
from relocd.engine.target import TargetSession
from relocd.protocol.codes import DigestAlgo
from relocd.protocol.records import Digest, Role
from relocd.protocol.state import Conversation
from tests.unit.simhosts import SimHost as Host
from tests.unit.simhosts import TappedChannel, sim_pair


@pytest.fixture
async def hosts(tmp_path: Path) -> AsyncIterator[tuple[Host, Host]]:
    async with sim_pair(tmp_path) as pair:
        yield pair


async def migrate(
    a: Host, b: Host, name: str, *, live: bool, verify: bool = True, policy=None, received: list[object] | None = None
):
    src_t, dst_t = memory_pipe()
    src = RecordChannel(src_t, Conversation(Role.SOURCE), max_frame=16 << 20)
    received = [] if received is None else received
    dst = TappedChannel(dst_t, Conversation(Role.TARGET), max_frame=16 << 20, received=received)
    dom = a.driver.lookup(name)
    assert dom is not None
    mig = SourceMigration(
        dom,
        src,
        SendOptions(live=live, verify=verify, policy=policy or DowntimePolicy(50)),
        journal=a.journal,
        migration_id=new_migration_id(),
        target="b",
    )
    session = TargetSession(dst, b.ctx, peer="a")
    result, _ = await asyncio.gather(mig.run(), session.run())
    return result


async def test_live_migration_keeps_every_page(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    await a.driver.create(DomainConfig(name="vm", memory_mib=32, workload="hotset:size=4MiB,rate=50MB/s"))
    await asyncio.sleep(0.2)
    received: list[object] = []
    result = await migrate(a, b, "vm", live=True, received=received)
    assert result.status == "completed", result.error
    assert result.verified is True
    assert [r.algo for r in received if isinstance(r, Digest)] == [DigestAlgo.BLAKE3]  # both sides offer it
    assert result.iterations >= 2
    assert a.driver.lookup("vm") is None
    moved = b.driver.lookup("vm")
    assert moved is not None and moved.state == DomainState.RUNNING
    await moved.pause()
    assert await moved.check_invariant() is None
    assert a.journal.get(result.migration_id).phase == Phase.DONE  # type: ignore[union-attr]


async def test_non_live_migration(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    await a.driver.create(DomainConfig(name="vm", memory_mib=16, workload="uniform:rate=20MB/s"))
    result = await migrate(a, b, "vm", live=False, policy=XendPolicy())
    assert result.status == "completed", result.error
    assert result.iterations == 1
    moved = b.driver.lookup("vm")
    assert moved is not None
    await moved.pause()
    assert await moved.check_invariant() is None


async def test_refused_reservation_leaves_source_running(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    b.ctx.max_memory = 8 << 20
    await a.driver.create(DomainConfig(name="big", memory_mib=16))
    result = await migrate(a, b, "big", live=True)
    assert result.status == "failed"
    assert "memory" in (result.error or "")
    dom = a.driver.lookup("big")
    assert dom is not None and dom.state == DomainState.RUNNING
    assert b.driver.domains() == []


async def test_verify_with_a_peer_that_only_knows_sha256(hosts: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch) -> None:
    """An older source (no DIGEST_BLAKE3 in its HELLO): both sides fall back to SHA-256."""
    from relocd.engine import handshake
    from relocd.protocol.records import Feature

    monkeypatch.setattr(handshake, "FEATURES", Feature.ZERO_PAGES | Feature.DIGEST_SHA256 | Feature.QUERY)
    a, b = hosts
    await a.driver.create(DomainConfig(name="old", memory_mib=16, workload="hotset:size=2MiB,rate=20MB/s"))
    received: list[object] = []
    result = await migrate(a, b, "old", live=True, verify=True, received=received)
    assert result.status == "completed", result.error
    assert result.verified is True
    assert [r.algo for r in received if isinstance(r, Digest)] == [DigestAlgo.SHA256]
