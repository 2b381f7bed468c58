"""Domains whose hypervisor moves memory itself: relocd carries the driver's stream.

A Xen PV guest's page tables hold machine frame numbers that only Xen's own
save/restore code can translate, so for such drivers (``transfer ==
"stream"``) the page path of ``source``/``target`` is replaced by this one:

* source: ``Domain.send_stream(live, policy, sink, on_round)`` produces the
  stream; relocd's policy answers every precopy round through the driver's
  callback; each chunk travels in a STREAM record, each round ends with
  END_ROUND, the policy's stop becomes STOP; VCPU_STATE (empty: the state is
  in the stream) and COMMIT close it;
* target: ``Driver.receive_stream(config, chunks, name=...)`` builds the
  domain, paused, from the chunks, while records keep arriving.

Everything else (reservation, journal, PREPARED/GO/RESUMED, rollback and
recovery) is shared with the page path.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from relocd.drivers.base import INCOMING_SUFFIX, Domain, DomainConfig, Driver
from relocd.engine.faults import fault_point
from relocd.engine.journal import Phase
from relocd.engine.result import RoundReport
from relocd.errors import ProtocolError
from relocd.protocol.records import Commit, Digest, EndRound, Stop, StreamChunk, VcpuState

if TYPE_CHECKING:
    from relocd.engine.source import SourceMigration
    from relocd.engine.target import TargetSession

#: chunks queued between the connection and a slower driver (bounded memory)
QUEUE_CHUNKS = 8


def uses_stream(obj: Domain | Driver) -> bool:
    """Does this domain's (or driver's) hypervisor move memory itself?"""
    return getattr(obj, "transfer", "pages") == "stream"


async def carried_config(dom: Domain) -> DomainConfig:
    """The config CONFIG carries.

    A stream driver lists its domains cheaply (no boot details, e.g. Xen's
    xenstore view); the target's builder needs the whole config, which such a
    driver reads on demand with ``read_config()``.
    """
    read = getattr(dom, "read_config", None)
    if uses_stream(dom) and read is not None:
        config: DomainConfig = await read()
        return config
    return dom.config


async def send_stream(mig: SourceMigration) -> None:
    """Source: from after CONFIG to COMMIT, for a stream domain."""
    dom: Any = mig.domain
    result = mig.result
    live = mig.opts.live

    async def stop(round_no: int) -> None:
        mig.journal.set_phase(mig.mid, Phase.STOPPED)
        result.mark("paused")
        mig._paused_at = time.monotonic()
        await mig._send(Stop(round_no))

    async def sink(chunk: bytes) -> None:
        await mig._send(StreamChunk(chunk))
        delay = mig.limiter.delay_for(len(chunk))
        if delay > 0:
            await asyncio.sleep(delay)

    async def on_round(decision: Any) -> None:
        round_no = len(result.rounds) + 1
        pages, dirty = int(decision.pages_sent), int(decision.dirty_pages)
        await mig._send(EndRound(round_no, pages, dirty))
        await fault_point("source", f"precopy-{round_no}")
        result.iterations = round_no
        result.pages_sent += pages
        result.rounds.append(
            RoundReport(round_no, pages, int(decision.bytes_sent), round(decision.duration_s * 1000, 3), dirty)
        )
        await mig.progress(
            phase="precopy",
            round=round_no,
            pages_left=dirty,
            expected_downtime_ms=decision.expected_downtime_ms,
        )
        if decision.stop_reason is not None:
            result.stop_reason = decision.stop_reason
            await stop(round_no + 1)

    if live:
        mig.journal.set_phase(mig.mid, Phase.STREAMING)
    else:
        await stop(1)
    await dom.send_stream(live, mig.opts.policy, sink, on_round)
    # The domain is suspended now: a rollback undoes it (Domain.undo_send).
    mig._we_paused = True
    await mig.hooks.paused(dom)
    await fault_point("source", "stop-and-copy")
    if live and result.stop_reason is None:
        # The driver stopped iterating on its own (e.g. its own round limit).
        raise ProtocolError("the driver's stream ended without relocd's stop decision", remote=False)
    result.iterations += 1
    await mig._send(VcpuState(dom.config.driver, b""))
    mig._committed = True
    await mig._send(Commit())
    result.mark("committed")


class DriverFeed:
    """A stream driver's ``receive_stream`` building a domain from chunks as they arrive.

    Used by a migration's target and by restore.  Memory stays bounded
    (``QUEUE_CHUNKS`` chunks queued); a driver that fails stops the feed with
    its own error; ``abandon`` cancels the build and destroys a domain it
    finished anyway (on a stream refused after its last chunk).
    """

    def __init__(self, driver: Driver, config: DomainConfig, name: str) -> None:
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(QUEUE_CHUNKS)
        receive: Callable[..., Awaitable[Domain]] = driver.receive_stream  # type: ignore[attr-defined]
        self._build: asyncio.Future[Domain] = asyncio.ensure_future(receive(config, self._chunks(), name=name))

    async def _chunks(self) -> AsyncIterator[bytes]:
        while (chunk := await self._queue.get()) is not None:
            yield chunk

    async def put(self, chunk: bytes | None) -> None:
        """Hand one chunk (None: the end) to the driver, waiting while it is behind."""
        put = asyncio.ensure_future(self._queue.put(chunk))
        both: set[asyncio.Future[Any]] = {put, self._build}
        done, _ = await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
        if self._build in done and put not in done:
            put.cancel()
            self._build.result()  # the driver failed: raise why
            raise ProtocolError("the driver finished building before the stream ended", remote=False)

    async def finish(self) -> Domain:
        """The end of the stream: the domain the driver built (paused)."""
        await self.put(None)
        return await self._build

    async def abandon(self) -> None:
        if not self._build.done():
            self._build.cancel()
        [built] = await asyncio.gather(self._build, return_exceptions=True)
        if isinstance(built, Domain):
            await built.destroy()


async def receive_stream(session: TargetSession, driver: Driver, config: DomainConfig) -> Domain:
    """Target: from after CONFIG to COMMIT, for a stream driver; returns the paused domain."""
    ch = session.channel
    feed = DriverFeed(driver, config, config.name + INCOMING_SUFFIX)
    try:
        while True:
            record = await ch.recv()
            session.ctx.reservations.touch(session.mid)
            if isinstance(record, StreamChunk):
                await feed.put(record.data)
            elif isinstance(record, EndRound):
                await session.progress(phase="precopy", round=record.round, dirty=record.dirty_next)
                await fault_point("target", f"precopy-{record.round}")
            elif isinstance(record, Stop):
                await session.progress(phase="stop-and-copy")
                await fault_point("target", "stop-and-copy")
            elif isinstance(record, VcpuState):
                if record.driver != config.driver:
                    raise ProtocolError(f"vCPU state for driver {record.driver!r}, domain uses {config.driver!r}")
            elif isinstance(record, Digest):
                pass  # memory is the driver's to check; the stream carries its own integrity checks
            elif isinstance(record, Commit):
                # The source waits on us from here: the build is no quiet source.
                session.ctx.reservations.pin(session.mid)
                break
            else:
                raise ProtocolError(f"{type(record).__name__} in a stream migration")
        domain = await feed.finish()
    except BaseException:
        await feed.abandon()
        raise
    session.domain = domain
    session.ctx.incoming[session.mid] = domain
    return domain
