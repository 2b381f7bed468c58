"""Parallel page channels: a migration's pages striped over several connections.

The main connection is channel 0 and carries every control record; extra
channels (protocol 1.1, feature CHANNELS) carry only PAGES, then
CHANNEL_END.  Page ``pfn`` always travels on channel
``(pfn // STRIPE_PAGES) % count``, so TCP's order on one connection is all the
order a page's successive copies need (docs/protocol.md, "Parallel
channels").  Each channel's bulk reads and writes run in their own worker
thread (server/transport.py), so N channels put N threads on the page path
at each end: on the target those threads also take the first-touch faults of
fresh guest memory, which is what limits one stream.

``SendChannels`` is the source's side (open, split, end); ``ReceiveChannels``
the target's (admit a JOIN, receive each channel's share, wait for the
ends).  Neither knows sockets: channels are ``RecordChannel``s.
"""

from __future__ import annotations

import asyncio
import hmac
import uuid as uuidlib
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import structlog

from relocd.engine.handshake import hello
from relocd.engine.stream import PeerGone, RecordChannel
from relocd.errors import AccessDenied, ProtocolError, Reason, RelocdError
from relocd.protocol.channel_records import CHANNEL_TOKEN_SIZE, MAX_CHANNELS, ChannelEnd, Join, Joined
from relocd.protocol.records import Abort, PagesHeader, Refuse, Role
from relocd.units import PAGE_SIZE

log = structlog.get_logger("relocd.channels")

Pfns = npt.NDArray[np.uint64]
_T = TypeVar("_T")

#: pages per stripe: 2 MiB, dealt out to the channels in turn
STRIPE_PAGES = 512
_STRIPE_SHIFT = STRIPE_PAGES.bit_length() - 1
assert 1 << _STRIPE_SHIFT == STRIPE_PAGES


def channel_of(pfns: Pfns, count: int) -> npt.NDArray[np.int64]:
    """The channel each page travels on."""
    return ((np.asarray(pfns, dtype=np.uint64) >> np.uint64(_STRIPE_SHIFT)) % np.uint64(count)).astype(np.int64)


def split_pfns(pfns: Pfns, count: int) -> list[Pfns]:
    """Sorted pfns, one sorted share per channel (``count`` shares, some maybe empty)."""
    if count == 1:
        return [pfns]
    which = channel_of(pfns, count)
    return [pfns[which == i] for i in range(count)]


async def run_together(coros: Sequence[Coroutine[Any, Any, _T]]) -> list[_T]:
    """Run coroutines at once; the first to fail cancels the others and its error is raised."""
    if len(coros) <= 1:
        return [await c for c in coros]
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    except asyncio.CancelledError:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    failed = [t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
    if failed:
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        raise failed[0].exception()  # type: ignore[misc]
    return [t.result() for t in tasks]


# -- the source's side -----------------------------------------------------------


class SendChannels:
    """The source's page channels: the main connection, then the extras it JOINed."""

    def __init__(self, main: RecordChannel) -> None:
        self.channels: list[RecordChannel] = [main]
        #: pages sent on each channel (CHANNEL_END tells the extras' counts)
        self.pages = [0]

    @property
    def count(self) -> int:
        return len(self.channels)

    async def open(
        self, dial: Callable[[], Awaitable[RecordChannel]], migration_id: str, token: bytes, count: int
    ) -> None:
        """Connect and JOIN channels 1..count-1 (all at once); any failure closes them all and raises."""
        results = await asyncio.gather(
            *(self._join(dial, migration_id, token, i, count) for i in range(1, count)), return_exceptions=True
        )
        opened = [r for r in results if isinstance(r, RecordChannel)]
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            for ch in opened:
                await ch.close()
            raise errors[0]
        self.channels.extend(opened)
        self.pages.extend(0 for _ in opened)

    @staticmethod
    async def _join(
        dial: Callable[[], Awaitable[RecordChannel]], migration_id: str, token: bytes, index: int, count: int
    ) -> RecordChannel:
        try:
            channel = await dial()
        except RelocdError as exc:
            raise PeerGone(f"channel {index}: {exc.message}", reason=exc.reason) from None
        try:
            await hello(channel, Role.CHANNEL, migration_id)
            await channel.send(Join(token, index, count))
            answer = await channel.recv()
            if isinstance(answer, Refuse | Abort):
                raise AccessDenied(f"target refused channel {index}: {answer.message}", reason=answer.reason)
            assert isinstance(answer, Joined)
        except BaseException:
            await channel.close()
            raise
        return channel

    def split(self, pfns: Pfns) -> list[Pfns]:
        return split_pfns(pfns, self.count)

    async def end(self) -> None:
        """Every page is out: CHANNEL_END on each extra channel (before VCPU_STATE on channel 0)."""
        await run_together([ch.send(ChannelEnd(n)) for ch, n in zip(self.channels[1:], self.pages[1:])])

    async def close(self) -> None:
        """Close the extra channels (channel 0 is the migration's to close)."""
        for ch in self.channels[1:]:
            await ch.close()


# -- the target's side -------------------------------------------------------------


class ReceiveChannels:
    """The extra channels a target granted one migration, from JOIN to CHANNEL_END.

    Made at RESERVE (with the token that goes out in RESERVED); each JOIN
    that passes ``admit`` is ``attach``ed; ``receive`` takes every extra
    channel's pages into guest memory while channel 0 is read by the
    transfer, and returns once each has sent CHANNEL_END with its count.
    ``release`` (always, when the migration is done with them) lets the
    connections close.
    """

    def __init__(self, count: int, token: bytes, *, peer: str, peer_identity: str | None) -> None:
        if not 2 <= count <= MAX_CHANNELS or len(token) != CHANNEL_TOKEN_SIZE:
            raise ValueError(f"bad channel grant: {count} channels, {len(token)}-byte token")
        self.count = count
        self.token = token
        self.peer = peer
        self.peer_identity = peer_identity
        loop = asyncio.get_running_loop()
        self._joined: dict[int, asyncio.Future[RecordChannel]] = {i: loop.create_future() for i in range(1, count)}
        self._released = asyncio.Event()
        #: no more JOINs: the state is in (or the migration failed)
        self.closed = False

    def admit(self, join: Join, *, peer: str, peer_identity: str | None) -> RelocdError | None:
        """Why this JOIN may not be taken (an error to REFUSE with), or None to take it."""
        if not hmac.compare_digest(join.token, self.token):
            return AccessDenied("wrong channel token", reason=Reason.ACCESS)
        if peer != self.peer or peer_identity != self.peer_identity:
            return AccessDenied("a channel must come from the peer that reserved the migration", reason=Reason.ACCESS)
        if self.closed:
            return ProtocolError("the migration takes no more channels", reason=Reason.PROTOCOL)
        if join.count != self.count:
            return ProtocolError(f"{join.count} channels, {self.count} were granted", reason=Reason.PROTOCOL)
        fut = self._joined.get(join.index)
        if fut is None or fut.done():
            return ProtocolError(f"channel {join.index} is already taken", reason=Reason.PROTOCOL)
        return None

    def attach(self, index: int, channel: RecordChannel) -> None:
        self._joined[index].set_result(channel)

    async def wait_released(self) -> None:
        await self._released.wait()

    def release(self) -> None:
        """The migration is done with its channels (received, or failed): their connections may close."""
        self.closed = True
        for fut in self._joined.values():
            if not fut.done():
                fut.cancel()
        self._released.set()

    async def receive(self, memory: memoryview, touch: Callable[[], object]) -> int:
        """Every extra channel's pages into ``memory``; the pages received in all.

        ``touch`` is called for each record (it keeps the reservation alive).
        Raises the first channel's failure (the others are cancelled).
        """
        counts = await run_together([self._receive_one(i, memory, touch) for i in sorted(self._joined)])
        self.closed = True
        return sum(counts)

    async def _receive_one(self, index: int, memory: memoryview, touch: Callable[[], object]) -> int:
        channel = await self._joined[index]
        # The migration's reservation watches silence on every channel together
        # (a channel may rightly carry nothing for a round): none of its own.
        channel.read_timeout = None
        channel.npages_limit = len(memory) // PAGE_SIZE
        pages = 0
        while True:
            try:
                record = await channel.recv()
            except PeerGone as exc:
                raise PeerGone(f"channel {index}: {exc.message}", reason=exc.reason) from None
            touch()
            if isinstance(record, PagesHeader):
                await channel.recv_pages_into(record, memory)
                pages += len(record.data_pfns) + len(record.zero_pfns)
            elif isinstance(record, ChannelEnd):
                if record.pages != pages:
                    raise ProtocolError(f"channel {index} says it carried {record.pages} pages, {pages} arrived")
                return pages
            elif isinstance(record, Abort):
                raise ProtocolError(f"channel {index}: source aborted: {record.message}")
            else:  # the state machine lets nothing else through
                raise ProtocolError(f"channel {index}: unexpected {type(record).__name__}")


async def serve_join(
    channel: RecordChannel,
    grant_for: Callable[[str], ReceiveChannels | None],
    *,
    peer: str,
    peer_identity: str | None,
) -> None:
    """An incoming connection whose HELLO said CHANNEL: JOIN it to its migration, or REFUSE.

    Once taken, the connection is the migration's until it releases its
    channels; this returns then, and the caller closes the connection.
    """
    join = await channel.recv()
    if not isinstance(join, Join):  # the state machine lets nothing else through
        raise ProtocolError(f"{type(join).__name__} where JOIN was due")
    peer_hello = channel.conversation.peer_hello
    migration_id = _uuid_text(peer_hello.migration_id) if peer_hello is not None else ""
    grant = grant_for(migration_id)
    problem = (
        grant.admit(join, peer=peer, peer_identity=peer_identity)
        if grant is not None
        else ProtocolError("no migration here is waiting for channels", reason=Reason.PROTOCOL)
    )
    if problem is not None:
        log.warning("channel refused", peer=peer, channel=join.index, error=problem.message)
        await channel.send(Refuse(problem.reason, problem.message))
        return
    assert grant is not None
    await channel.send(Joined())
    grant.attach(join.index, channel)
    log.info("channel joined", peer=peer, channel=join.index, channels=join.count)
    await grant.wait_released()


def _uuid_text(raw: bytes) -> str:
    return str(uuidlib.UUID(bytes=raw))
