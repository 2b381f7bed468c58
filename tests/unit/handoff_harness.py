"""The harness of the exactly-once tests (test_exactly_once.py): two hosts in one process.

Sim drivers, journals and TargetContexts joined by in-memory pipes; a
restarted daemon is recovery run on that host's journal, context and driver
(``Restarted``); source channels that lose the link at a chosen record; the
helpers that drive a race to the exact await that mattered.
"""

from __future__ import annotations

import asyncio
import inspect
import uuid as uuidlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from relocd.config.settings import Settings
from relocd.drivers.base import DomainState, Driver
from relocd.drivers.sim import SimDriver
from relocd.engine import source as source_mod
from relocd.engine.handshake import hello
from relocd.engine.journal import Journal
from relocd.engine.policy import XendPolicy
from relocd.engine.reservation import ReservationTable
from relocd.engine.source import SendOptions, SourceMigration, new_migration_id
from relocd.engine.stream import MemoryTransport, PeerGone, RecordChannel, memory_pipe
from relocd.engine.target import TargetContext, TargetSession
from relocd.errors import RelocdError
from relocd.protocol.records import (
    Go,
    Prepared,
    Query,
    Record,
    Reserve,
    Role,
)
from relocd.protocol.state import Conversation
from relocd.server import recovery
from relocd.server.daemon import Daemon
from relocd.server.operations import Operations

#: the addresses the two hosts see each other from (the target binds a migration to it)
A_ADDR = "127.0.0.1"
B_ADDR = "127.0.0.2"
B_PEER = f"{B_ADDR}:8002"  # what a source journals as its target
WAIT_S = 30.0


# -- two hosts in one process ----------------------------------------------------


class Host:
    def __init__(self, root: Path, name: str, driver: Driver | None = None) -> None:
        self.name = name
        self.dir = root / name
        self.dir.mkdir(parents=True)
        self.driver = driver or SimDriver(self.dir)
        self.journal = Journal(self.dir / "journal.sqlite")
        self.ctx = TargetContext(
            drivers={self.driver.name: self.driver}, reservations=ReservationTable(30), journal=self.journal
        )
        self.sessions: list[asyncio.Task[None]] = []

    def restarted(self) -> Restarted:
        """The daemon that starts on this host: its recovery sees this journal and these domains."""
        return Restarted(self)

    def listing(self) -> list[tuple[str, str]]:
        return sorted((d.name, d.state.value) for d in self.driver.domains())

    def serve(self, peer: str, *, channel: type[RecordChannel] = RecordChannel, **session: Any) -> RecordChannel:
        """One connection to this host's relocation service, from ``peer``: the initiator's channel."""
        ours, theirs = memory_pipe()
        target_channel = channel(theirs, Conversation(Role.TARGET), max_frame=16 << 20)
        task = asyncio.ensure_future(TargetSession(target_channel, self.ctx, peer=peer, **session).run())
        self.sessions.append(task)
        return RecordChannel(ours, Conversation(Role.QUERY), max_frame=16 << 20)


@pytest.fixture
async def hosts(tmp_path: Path) -> AsyncIterator[tuple[Host, Host]]:
    a, b = Host(tmp_path, "a"), Host(tmp_path, "b")
    await a.driver.start()
    await b.driver.start()
    try:
        yield a, b
    finally:
        for h in (a, b):
            for t in h.sessions:
                t.cancel()
            await asyncio.gather(*h.sessions, return_exceptions=True)
            for d in h.driver.domains():
                await d.destroy()
            await h.driver.close()
            h.journal.close()


class Restarted:
    """A daemon restarted on ``host``, as far as recovery and ``status`` see it.

    Recovery's entry point takes the whole Daemon (1ad14f0 and before), or the
    host object and the settings (the host refactor: STYLE.md's "a fully built
    host object"); the tests drive whichever this tree has.
    """

    def __init__(self, host: Host) -> None:
        self.host = host
        self.settings = Settings()
        self._daemon: Any = None

    @property
    def daemon(self) -> Any:
        if self._daemon is None:
            self._daemon = Daemon(self.settings)
            self._daemon.journal = self.host.journal
            self._daemon.ctx = self.host.ctx
            self._daemon.drivers = {self.host.driver.name: self.host.driver}
        return self._daemon

    @staticmethod
    def _takes_daemon(fn: Callable[..., object]) -> bool:
        return "daemon" in inspect.signature(fn).parameters

    async def recover(self) -> None:
        recover: Any = recovery.recover_unfinished
        if self._takes_daemon(recover):
            await recover(self.daemon)
        else:
            await recover(self.host.ctx, self.settings)

    @property
    def background(self) -> set[asyncio.Task[Any]]:
        tasks: set[asyncio.Task[Any]] = set(getattr(self.host.ctx, "background", ()))
        if self._daemon is not None:
            tasks |= self._daemon.background
        return tasks

    async def status(self) -> dict[str, Any]:
        ops: Any = Operations
        if self._takes_daemon(ops.__init__):
            ops = ops(self.daemon)
        else:
            ops = ops(self.host.ctx, self.settings, lambda: [])
        result: dict[str, Any] = await ops.status({}, None)
        return result


async def reached(what: str, awaitable: Awaitable[Any]) -> Any:
    """Await a gate (or a task) the test relies on; a hang is a failure naming it."""
    try:
        return await asyncio.wait_for(awaitable, WAIT_S)
    except TimeoutError:
        raise AssertionError(f"never reached: {what}") from None


def running_copies(*hosts: Host) -> list[tuple[str, str]]:
    return [(h.name, d.name) for h in hosts for d in h.driver.domains() if d.state == DomainState.RUNNING]


async def settle(daemon: Restarted) -> None:
    """Wait for what recovery spawned (resolvers, follow-ups)."""
    background = daemon.background
    if background:
        await reached("recovery's background work to end", asyncio.gather(*list(background)))


class FastBackoff:
    """The QUERY client's retry delay, without the delay (the retries are what is under test)."""

    def __init__(self, first: float = 0.0, cap: float = 0.0) -> None:
        self.delay = 0.0

    async def wait(self) -> None:
        await asyncio.sleep(0)


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    # Absent before the fix (the old code slept in place); raising=False keeps the test runnable there.
    monkeypatch.setattr(source_mod, "Backoff", FastBackoff, raising=False)
    monkeypatch.setattr(recovery, "Backoff", FastBackoff, raising=False)


class Dialler:
    """The source's way to the target: each call one new in-memory connection to ``host``.

    The first ``fail_first`` calls fail like a refused connect; the call
    numbered ``hold_at`` (from 1) announces itself on ``held`` and waits for
    ``gate`` before connecting.  As a Reconnect it returns a QUERY channel;
    as recovery's ``connect`` it returns the transport.
    """

    def __init__(self, host: Host, peer: str, *, fail_first: int = 0, hold_at: int | None = None) -> None:
        self.host = host
        self.peer = peer
        self.fail_first = fail_first
        self.hold_at = hold_at
        self.held = asyncio.Event()
        self.gate = asyncio.Event()
        self.calls = 0
        self.dialled: list[tuple[str, object, int]] = []

    async def _dial(self) -> RecordChannel:
        self.calls += 1
        if self.calls <= self.fail_first:
            raise ConnectionRefusedError(f"connection refused (attempt {self.calls})")
        if self.calls == self.hold_at:
            self.held.set()
            await self.gate.wait()
        return self.host.serve(self.peer)

    async def __call__(self) -> RecordChannel:
        return await self._dial()

    async def connect(self, host: str, port: int, timeout: float | None = None) -> MemoryTransport:
        self.dialled.append(("plain", host, port))
        channel = await self._dial()
        return channel.transport  # type: ignore[return-value]

    async def connect_tls(self, server_name: str, port: int, ctx: object, timeout: float | None = None) -> MemoryTransport:
        self.dialled.append(("tls", server_name, port))
        channel = await self._dial()
        return channel.transport  # type: ignore[return-value]


# -- source channels that lose the link at a chosen record -------------------------


class GoAtGate(RecordChannel):
    """The source's channel: GO waits at ``gate`` (the target sits at PREPARED meanwhile)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.at_go = asyncio.Event()
        self.gate = asyncio.Event()

    async def send(self, record: Record) -> None:
        if isinstance(record, Go):
            self.at_go.set()
            await self.gate.wait()
        await super().send(record)


class LostAfterPrepared(RecordChannel):
    """The source's channel: the link dies just as PREPARED arrives (the source never acts on it)."""

    async def recv(self) -> Any:
        record = await super().recv()
        if isinstance(record, Prepared):
            await self.transport.close()
            raise PeerGone("link lost as PREPARED arrived")
        return record


class LostWithGo(RecordChannel):
    """The source's channel: GO is journaled, then the link dies with it unsent."""

    async def send(self, record: Record) -> None:
        if isinstance(record, Go):
            await self.transport.close()
            raise PeerGone("link lost with GO")
        await super().send(record)


class GoNoticed(RecordChannel):
    """A target's channel that says when a GO has arrived on it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.got_go = asyncio.Event()

    async def recv(self) -> Any:
        record = await super().recv()
        if isinstance(record, Go):
            self.got_go.set()
        return record


def start_migration(
    a: Host, b: Host, name: str, channel: type[RecordChannel], *,
    recovery_s: float = 30.0, reconnect: Any = None, target_peer: str = "a", session: dict[str, Any] | None = None,
) -> tuple[SourceMigration, RecordChannel, asyncio.Task[Any]]:  # fmt: skip
    """A non-live migration of ``name`` from a to b; returns the migration, its channel and its task."""
    src_t, dst_t = memory_pipe()
    src = channel(src_t, Conversation(Role.SOURCE), max_frame=16 << 20)
    dst = RecordChannel(dst_t, Conversation(Role.TARGET), max_frame=16 << 20)
    dom = a.driver.lookup(name)
    assert dom is not None
    mig = SourceMigration(
        dom, src, SendOptions(live=False, verify=False, policy=XendPolicy(), recovery_s=recovery_s),
        journal=a.journal, migration_id=new_migration_id(), target=B_PEER, reconnect=reconnect,
    )  # fmt: skip
    b.sessions.append(asyncio.ensure_future(TargetSession(dst, b.ctx, peer=target_peer, **(session or {})).run()))
    return mig, src, asyncio.ensure_future(mig.run())


async def query(channel: RecordChannel, mid: str) -> Any:
    """HELLO(QUERY) and QUERY on ``channel``; the target's first answer (OUTCOME, or whatever came)."""
    await hello(channel, Role.QUERY, mid)
    await channel.send(Query(uuidlib.UUID(mid).bytes))
    return await channel.recv()


def reserve_request(name: str, memory_mib: int = 16) -> dict[str, Any]:
    return {
        "name": name, "uuid": str(uuidlib.uuid4()), "memory_bytes": memory_mib << 20, "vcpus": 1,
        "driver": "sim", "cpu_features": [], "bridges": [], "live": True, "verify": False,
        "host_id": None, "source_port": None,
    }  # fmt: skip


async def raw_source(host: Host, peer: str, mid: str, request: dict[str, Any], **session: Any) -> RecordChannel:
    """A source driven by hand: HELLO(SOURCE) and RESERVE sent; the answer is the caller's to read."""
    ours, theirs = memory_pipe()
    host.sessions.append(
        asyncio.ensure_future(
            TargetSession(RecordChannel(theirs, Conversation(Role.TARGET), max_frame=16 << 20), host.ctx,
                          peer=peer, **session).run()  # fmt: skip
        )
    )
    channel = RecordChannel(ours, Conversation(Role.SOURCE), max_frame=16 << 20)
    await hello(channel, Role.SOURCE, mid)
    await channel.send(Reserve(request))
    return channel


async def first_record(channel: RecordChannel) -> object:
    """The next record, or the error reading it (the peer hung up)."""
    try:
        return await channel.recv()
    except (RelocdError, OSError) as exc:
        return exc
