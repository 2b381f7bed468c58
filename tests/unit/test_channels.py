"""Parallel page channels (engine/channels.py) end to end with the sim driver, over in-memory pipes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from relocd.drivers.base import DomainConfig, DomainState
from relocd.engine import channels as channels_mod
from relocd.engine import handshake
from relocd.engine.channels import STRIPE_PAGES, ReceiveChannels, SendChannels, serve_join, split_pfns
from relocd.engine.policy import DowntimePolicy
from relocd.engine.result import MigrationResult
from relocd.engine.source import SendOptions, SourceMigration, new_migration_id
from relocd.engine.stream import MemoryTransport, PeerGone, RecordChannel, memory_pipe
from relocd.engine.target import TargetSession
from relocd.errors import Reason
from relocd.protocol.channel_records import ChannelEnd, Join
from relocd.protocol.records import Feature, Hello, PagesHeader, Refuse, Role
from relocd.protocol.state import Conversation
from tests.unit.simhosts import SimHost as Host
from tests.unit.simhosts import sim_pair


@pytest.fixture
async def hosts(tmp_path: Path) -> AsyncIterator[tuple[Host, Host]]:
    async with sim_pair(tmp_path) as pair:
        yield pair


class Tapped(RecordChannel):
    """A target-side channel that remembers the PAGES it received (to see the striping)."""

    def __init__(self, *args: object, seen: list[tuple[int, np.ndarray]], index: list[int], **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.seen = seen
        self.index = index

    async def recv(self) -> object:
        record = await super().recv()
        if isinstance(record, PagesHeader):
            self.seen.append((self.index[0], np.concatenate((record.data_pfns, record.zero_pfns))))
        return record


class Link:
    """A source and a target daemon joined by pipes: every dial opens one more session on the target."""

    def __init__(self, b: Host, *, peer: str = "a") -> None:
        self.b = b
        self.peer = peer
        self.sessions: list[asyncio.Task[None]] = []
        self.seen: list[tuple[int, np.ndarray]] = []
        self.dialled = 0
        #: dial number -> writes after which its source end breaks (a channel lost mid-move)
        self.break_after: dict[int, int] = {}

    def connect(self) -> RecordChannel:
        src_t, dst_t = memory_pipe()
        n = self.dialled
        self.dialled += 1
        if n in self.break_after:
            src_t = BreakingTransport(src_t, self.break_after[n])
        src = RecordChannel(src_t, Conversation(Role.SOURCE if n == 0 else Role.CHANNEL), max_frame=16 << 20)
        dst = Tapped(dst_t, Conversation(Role.TARGET), max_frame=16 << 20, seen=self.seen, index=[n])
        session = TargetSession(dst, self.b.ctx, peer=self.peer)
        self.sessions.append(asyncio.ensure_future(session.run()))
        return src

    async def dial(self) -> RecordChannel:
        return self.connect()


class BreakingTransport(MemoryTransport):
    """A pipe end whose writes fail after ``after`` of them: the connection is lost."""

    def __init__(self, inner: MemoryTransport, after: int) -> None:
        super().__init__(inner._in, inner._out)
        self.left = after

    async def write(self, buffers: Sequence[bytes | memoryview]) -> None:
        if self.left <= 0:
            await self.close()
            raise PeerGone("connection lost: broken on purpose")
        self.left -= 1
        await super().write(buffers)


async def migrate(a: Host, link: Link, name: str, *, live: bool, channels: int) -> MigrationResult:
    dom = a.driver.lookup(name)
    assert dom is not None
    mig = SourceMigration(
        dom,
        link.connect(),
        SendOptions(live=live, verify=True, policy=DowntimePolicy(50), channels=channels),
        journal=a.journal,
        migration_id=new_migration_id(),
        target="b",
        dial_channel=link.dial,
    )
    result = await mig.run()
    await asyncio.wait_for(asyncio.gather(*link.sessions), 10)
    return result


def test_a_page_always_takes_the_same_channel() -> None:
    pfns = np.arange(10 * STRIPE_PAGES, dtype=np.uint64)
    shares = split_pfns(pfns, 3)
    assert sorted(np.concatenate(shares).tolist()) == pfns.tolist()
    for i, share in enumerate(shares):
        assert set(((share // STRIPE_PAGES) % 3).tolist()) == {i}
        assert np.all(np.diff(share.astype(np.int64)) > 0)  # still sorted
    # a round's dirty subset lands on the same channels as round 1
    dirty = np.array([5, STRIPE_PAGES + 1, 7 * STRIPE_PAGES + 3], dtype=np.uint64)
    for i, share in enumerate(split_pfns(dirty, 3)):
        assert set(share.tolist()) <= set(shares[i].tolist())
    assert split_pfns(pfns, 1)[0] is pfns


async def test_live_migration_over_three_channels_keeps_every_page(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    await a.driver.create(DomainConfig(name="vm", memory_mib=32, workload="hotset:size=8MiB,rate=50MB/s"))
    await asyncio.sleep(0.2)
    link = Link(b)
    result = await migrate(a, link, "vm", live=True, channels=3)
    assert result.status == "completed", result.error
    assert result.channels == 3 and link.dialled == 3
    assert result.verified is True and result.iterations >= 2
    moved = b.driver.lookup("vm")
    assert moved is not None and moved.state == DomainState.RUNNING
    await moved.pause()
    assert await moved.check_invariant() is None
    # every channel carried pages, and each only its own stripes, in every round
    by_channel: dict[int, set[int]] = {}
    for index, pfns in link.seen:
        assert set(((pfns // STRIPE_PAGES) % 3).tolist()) == {index}
        by_channel.setdefault(index, set()).update(pfns.tolist())
    assert sorted(by_channel) == [0, 1, 2]
    assert a.driver.lookup("vm") is None


async def test_a_target_without_channels_gets_one_connection(
    hosts: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer that predates protocol 1.1 sets no CHANNELS bit: the migration runs on the main connection."""
    a, b = hosts
    monkeypatch.setattr(handshake, "FEATURES", handshake.FEATURES & ~Feature.CHANNELS)
    await a.driver.create(DomainConfig(name="vm", memory_mib=16))
    link = Link(b)
    result = await migrate(a, link, "vm", live=False, channels=4)
    assert result.status == "completed", result.error
    assert result.channels == 1 and link.dialled == 1


async def test_a_channel_lost_mid_move_rolls_back_cleanly(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    await a.driver.create(DomainConfig(name="vm", memory_mib=32, workload="uniform:rate=10MB/s"))
    link = Link(b)
    link.break_after[2] = 4  # channel 2: HELLO, JOIN, then two PAGES, then lost
    result = await migrate(a, link, "vm", live=True, channels=3)
    assert result.status == "rolled-back"
    assert "broken on purpose" in (result.error or "")
    dom = a.driver.lookup("vm")
    assert dom is not None and dom.state == DomainState.RUNNING
    assert b.driver.domains() == []
    assert b.ctx.reservations.all() == [] and b.ctx.incoming == {}
    entry = a.journal.get(result.migration_id)
    assert entry is not None and entry.finished and entry.outcome == "rolled-back"
    target_entry = b.journal.get(result.migration_id)
    assert target_entry is not None and target_entry.finished


async def test_a_miscounted_channel_end_fails_the_move(hosts: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = hosts
    await a.driver.create(DomainConfig(name="vm", memory_mib=16))

    async def lying_end(self: SendChannels) -> None:
        for ch, n in zip(self.channels[1:], self.pages[1:]):
            await ch.send(ChannelEnd(n + 1))

    monkeypatch.setattr(SendChannels, "end", lying_end)
    link = Link(b)
    result = await migrate(a, link, "vm", live=False, channels=2)
    assert result.status == "rolled-back"
    assert "carried" in (result.error or "")
    dom = a.driver.lookup("vm")
    assert dom is not None and dom.state == DomainState.RUNNING
    assert b.driver.domains() == []


# -- admission of a JOIN ---------------------------------------------------------------


async def _join(grant: ReceiveChannels | None, join: Join, *, peer: str = "a", identity: str | None = None) -> object:
    """Run serve_join for one JOIN; what the target answered."""
    src_t, dst_t = memory_pipe()
    src = RecordChannel(src_t, Conversation(Role.CHANNEL), max_frame=1 << 20)
    dst = RecordChannel(dst_t, Conversation(Role.TARGET), max_frame=1 << 20)
    mid = new_migration_id()

    async def target() -> None:
        await handshake.answer_hello(dst)
        await serve_join(dst, lambda _mid: grant, peer=peer, peer_identity=identity)

    serving = asyncio.ensure_future(target())
    await handshake.hello(src, Role.CHANNEL, mid)
    await src.send(join)
    answer = await src.recv()
    if grant is not None and not isinstance(answer, Refuse):
        grant._released.set()  # the migration is done with it: serve_join returns
    await asyncio.wait_for(serving, 5)
    if grant is not None:
        grant._released.clear()
    return answer


@pytest.mark.parametrize(
    ("join", "peer", "identity", "words"),
    [
        (Join(bytes(16), 1, 3), "a", None, "wrong channel token"),
        (Join(b"t" * 16, 1, 3), "10.0.0.9", None, "peer that reserved"),
        (Join(b"t" * 16, 1, 3), "a", "CN=other", "peer that reserved"),
        (Join(b"t" * 16, 1, 4), "a", None, "3 were granted"),
    ],
)
async def test_a_join_that_does_not_match_its_grant_is_refused(join: Join, peer: str, identity: str | None, words: str) -> None:
    grant = ReceiveChannels(3, b"t" * 16, peer="a", peer_identity=None)
    answer = await _join(grant, join, peer=peer, identity=identity)
    assert isinstance(answer, Refuse) and words in answer.message
    assert not any(f.done() for f in grant._joined.values())  # nothing taken


async def test_a_join_is_taken_once_and_not_after_the_state() -> None:
    grant = ReceiveChannels(3, b"t" * 16, peer="a", peer_identity=None)
    first = await _join(grant, Join(b"t" * 16, 2, 3))
    assert type(first).__name__ == "Joined"
    again = await _join(grant, Join(b"t" * 16, 2, 3))
    assert isinstance(again, Refuse) and again.reason is Reason.PROTOCOL and "already taken" in again.message
    grant.closed = True
    late = await _join(grant, Join(b"t" * 16, 1, 3))
    assert isinstance(late, Refuse) and "no more channels" in late.message
    nobody = await _join(None, Join(b"t" * 16, 1, 3))
    assert isinstance(nobody, Refuse) and "no migration here" in nobody.message


def test_hello_role_channel_round_trips() -> None:
    assert Hello.current(Role.CHANNEL, bytes(16)).role is Role.CHANNEL
    assert channels_mod.MAX_CHANNELS == 16
