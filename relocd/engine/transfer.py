"""How a domain's state travels, one object per kind: guest pages, or a hypervisor's own stream.

The driver seam declares the kind (``Domain.transfer``, ``Driver.transfer``:
PAGES or STREAM); ``transfer_for`` maps it to the one object that moves the
records between CONFIG and COMMIT, for a migration and for a savefile alike
(a file is just another channel; what a save writes there, each kind's
``save``, is in ``transfer_save``).  What differs between the kinds is said
here once, as attributes and methods of these objects, so the code around
them (source, target, savefile, recovery) never asks which kind it has:

* PAGES: the engine reads guest memory and the dirty log itself.  Rounds of
  PAGES records, STOP, the last dirty pages, VCPU_STATE, optionally DIGEST.
  The target builds the empty domain at RESERVE, so the memory is set aside
  before the source commits to anything.
* STREAM: the hypervisor must do it (a Xen PV guest's page tables hold
  machine frames only Xen's save code can translate).  The domain's
  ``send_stream`` produces chunks carried in STREAM records, relocd's policy
  deciding the rounds through its callback; the target's driver builds the
  domain from the chunks with ``receive_stream`` while they arrive.  The
  state is inside the stream (VCPU_STATE is empty) and so are its checks
  (no memory digest).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, ClassVar, cast

from relocd.drivers.base import PAGES, STREAM, Domain, DomainConfig, Driver, RoundDecision
from relocd.engine.channels import ReceiveChannels, run_together
from relocd.engine.faults import fault_point
from relocd.engine.journal import Phase
from relocd.engine.pages import memory_digest
from relocd.engine.reservation import ReservationTable
from relocd.engine.result import Progress, RoundReport, no_progress
from relocd.engine.stream import RecordChannel
from relocd.engine.transfer_save import FileSave, PagedSave, Saving, StreamSave
from relocd.errors import DriverError, MigrationAborted, ProtocolError
from relocd.protocol.records import (
    Abort,
    Commit,
    Digest,
    DigestAlgo,
    EndRound,
    PagesHeader,
    Stop,
    StreamChunk,
    VcpuState,
)

if TYPE_CHECKING:
    from relocd.engine.source import SourceMigration

#: chunks queued between the connection and a slower driver (bounded memory)
QUEUE_CHUNKS = 8


@dataclasses.dataclass
class Landing:
    """Where an incoming domain's state lands: a migration's target, or a restore.

    ``domain`` is the empty domain built at RESERVE, where the kind builds
    it then (PAGES migrations); otherwise the transfer builds it, paused, as
    ``name``.  Every record keeps ``reservation_id`` alive in
    ``reservations``; from COMMIT on it is pinned (the sender waits on us).
    ``register`` is told the domain as soon as it exists (for cleanup and
    ``relocd list``).  ``faults`` names the side whose fault points the
    records reach (None: none, as for a restore).
    """

    driver: Driver
    config: DomainConfig
    name: str
    reservations: ReservationTable
    reservation_id: str
    register: Any  # Callable[[Domain], None]
    domain: Domain | None = None
    progress: Progress = no_progress
    faults: str | None = None
    #: PAGES: hash our memory as soon as the state arrives (the sender asked to verify)
    hash_algo: DigestAlgo | None = None
    #: PAGES: the extra page channels granted at RESERVE (engine/channels.py)
    channels: ReceiveChannels | None = None


@dataclasses.dataclass
class Received:
    """CONFIG..COMMIT received: the domain, paused, and what came with it."""

    domain: Domain
    #: vCPU and device state to load (PAGES); None where it travelled inside the stream
    state: bytes | None
    #: the sender's DIGEST record, if it sent one
    digest: Digest | None = None
    pages: int = 0
    stream_bytes: int = 0
    _ours: asyncio.Future[bytes] | None = dataclasses.field(default=None, repr=False)

    async def memory_matches(self) -> bool | None:
        """Does our memory hash to the sender's DIGEST?  None when there is none to compare."""
        if self.digest is None:
            return None
        ours = self._ours
        if ours is None:
            ours = asyncio.ensure_future(asyncio.to_thread(memory_digest, self.domain.memory(), self.digest.algo))
        return await ours == self.digest.value

    async def load_state(self) -> None:
        if self.state is not None:
            await self.domain.load_state(self.state)


class Transfer:
    """What one kind of transfer means; see the module docstring."""

    kind: ClassVar[str]
    #: the target builds the empty domain at RESERVE (and configures it at CONFIG)
    builds_at_reserve: ClassVar[bool]
    #: a digest of guest memory means something (--verify, savefile DIGEST)
    verifies_memory: ClassVar[bool]
    #: a live save (save --checkpoint) can leave the domain running
    checkpoints: ClassVar[bool]
    #: the records may be striped over extra page channels (engine/channels.py)
    stripes: ClassVar[bool]

    async def send(self, mig: SourceMigration) -> None:
        """Source of a migration: from after CONFIG to COMMIT."""
        raise NotImplementedError

    async def receive(self, channel: RecordChannel, at: Landing) -> Received:
        """From after CONFIG to COMMIT, into ``at``; the domain comes back paused."""
        raise NotImplementedError

    def save(self, saving: Saving) -> FileSave:
        """A save's records from after CONFIG to COMMIT: ``run()`` them, ``undo()`` on failure."""
        raise NotImplementedError

    @staticmethod
    async def _round_ended(at: Landing, round_no: int, dirty: int) -> None:
        if at.faults is not None and round_no <= 2:
            await fault_point(at.faults, f"precopy-{round_no}")
        await at.progress(phase="precopy", round=round_no, dirty=dirty)

    @staticmethod
    async def _stopped(at: Landing) -> None:
        if at.faults is not None:
            await fault_point(at.faults, "stop-and-copy")
        await at.progress(phase="stop-and-copy")


class PagedTransfer(Transfer):
    kind = PAGES
    builds_at_reserve = True
    verifies_memory = True
    checkpoints = True
    stripes = True

    async def send(self, mig: SourceMigration) -> None:
        if mig.opts.live:
            mig.journal.set_phase(mig.mid, Phase.STREAMING)
            await mig.precopy()
        await mig.stop_and_copy()

    def save(self, saving: Saving) -> FileSave:
        return PagedSave(saving)

    async def receive(self, channel: RecordChannel, at: Landing) -> Received:
        domain = at.domain
        if domain is None:
            domain = await at.driver.create(at.config.model_copy(update={"name": at.name}), start=False)
            at.register(domain)
        extra = at.channels
        if extra is None:
            return await self._receive(channel, at, domain, None)
        # Extra channels: each takes its share into memory while channel 0 is
        # read here; the first to fail ends them all.
        arrived: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def extras() -> None:
            arrived.set_result(await extra.receive(domain.memory(), lambda: at.reservations.touch(at.reservation_id)))

        quiet = channel.read_timeout
        channel.read_timeout = None  # the reservation watches all the channels' silence together
        try:
            results = await run_together([self._receive(channel, at, domain, arrived), extras()])
        finally:
            channel.read_timeout = quiet
        return cast(Received, results[0])

    async def _receive(
        self, channel: RecordChannel, at: Landing, domain: Domain, arrived: asyncio.Future[int] | None
    ) -> Received:
        """Channel 0 from after CONFIG to COMMIT; ``arrived``: the extra channels' pages, once all ended."""
        memory = domain.memory()
        state: bytes | None = None
        digest: Digest | None = None
        ours: asyncio.Future[bytes] | None = None
        pages = 0
        while True:
            record = await channel.recv()
            at.reservations.touch(at.reservation_id)
            if isinstance(record, PagesHeader):
                await channel.recv_pages_into(record, memory)
                pages += len(record.data_pfns) + len(record.zero_pfns)
            elif isinstance(record, EndRound):
                await self._round_ended(at, record.round, record.dirty_next)
            elif isinstance(record, Stop):
                await self._stopped(at)
            elif isinstance(record, VcpuState):
                if record.driver != domain.config.driver:
                    raise ProtocolError(
                        f"vCPU state for driver {record.driver!r}, domain uses {domain.config.driver!r}"
                    )
                state = record.blob
                if arrived is not None:
                    pages += await arrived  # every channel's last page is in
                if at.hash_algo is not None:
                    # Every page is here now: hash ours while the sender hashes
                    # its own, instead of after its DIGEST (halves --verify's cost).
                    ours = asyncio.ensure_future(asyncio.to_thread(memory_digest, memory, at.hash_algo))
            elif isinstance(record, Digest):
                digest = record
                if ours is not None and record.algo != at.hash_algo:
                    ours = None  # not hashed its way: memory_matches hashes again
            elif isinstance(record, Commit):
                at.reservations.pin(at.reservation_id)
                break
            elif isinstance(record, Abort):
                raise MigrationAborted(f"source aborted: {record.message}", reason=record.reason)
            else:  # the state machine lets nothing else through
                raise ProtocolError(f"unexpected record {type(record).__name__}")
        if state is None:
            raise ProtocolError("stream ended without vCPU state")
        return Received(domain, state, digest, pages=pages, _ours=ours)


class StreamTransfer(Transfer):
    kind = STREAM
    builds_at_reserve = False
    verifies_memory = False
    checkpoints = True  # a live send_stream, then undo_send (transfer_save.StreamSave)
    stripes = False  # one hypervisor stream, in order

    async def send(self, mig: SourceMigration) -> None:
        dom = mig.domain
        result = mig.result
        live = mig.opts.live

        async def stop(round_no: int) -> None:
            mig.journal.set_phase(mig.mid, Phase.STOPPED)
            result.mark("paused")
            mig.paused_at = time.monotonic()
            await mig.send(Stop(round_no))

        async def sink(chunk: bytes) -> None:
            await mig.send(StreamChunk(chunk))
            delay = mig.limiter.delay_for(len(chunk))
            if delay > 0:
                await asyncio.sleep(delay)

        async def on_round(decision: RoundDecision) -> None:
            round_no = len(result.rounds) + 1
            pages, dirty = int(decision.pages_sent), int(decision.dirty_pages)
            await mig.send(EndRound(round_no, pages, dirty))
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
        # Suspended now, by the driver's save: a rollback undoes it (Domain.undo_send).
        await mig.copy.suspended_by_send()
        await fault_point("source", "stop-and-copy")
        if live and result.stop_reason is None:
            # The driver stopped iterating on its own (e.g. its own round limit).
            raise ProtocolError("the driver's stream ended without relocd's stop decision", remote=False)
        result.iterations += 1
        await mig.send(VcpuState(dom.config.driver, b""))
        mig.committed = True
        await mig.send(Commit())
        result.mark("committed")

    def save(self, saving: Saving) -> FileSave:
        return StreamSave(saving)

    async def receive(self, channel: RecordChannel, at: Landing) -> Received:
        config = at.config
        feed = DriverFeed(at.driver, config, at.name)
        fed = 0
        try:
            while True:
                record = await channel.recv()
                at.reservations.touch(at.reservation_id)
                if isinstance(record, StreamChunk):
                    fed += len(record.data)
                    await feed.put(record.data)
                elif isinstance(record, EndRound):
                    await self._round_ended(at, record.round, record.dirty_next)
                elif isinstance(record, Stop):
                    await self._stopped(at)
                elif isinstance(record, VcpuState):
                    if record.driver != config.driver:
                        raise ProtocolError(
                            f"vCPU state for driver {record.driver!r}, domain uses {config.driver!r}"
                        )
                elif isinstance(record, Digest):
                    pass  # memory is the driver's to check; the stream carries its own checks
                elif isinstance(record, Commit):
                    # The sender waits on us from here: the build is no quiet source.
                    at.reservations.pin(at.reservation_id)
                    break
                elif isinstance(record, Abort):
                    raise MigrationAborted(f"source aborted: {record.message}", reason=record.reason)
                else:
                    what = "PAGES" if isinstance(record, PagesHeader) else type(record).__name__
                    raise ProtocolError(f"{what} where a {config.driver} domain's stream was due")
            if fed == 0:
                raise ProtocolError("no STREAM record: the domain's stream is missing")
            domain = await feed.finish()
        except BaseException:
            await feed.abandon()
            raise
        at.register(domain)
        return Received(domain, None, stream_bytes=fed)


class DriverFeed:
    """A driver's ``receive_stream`` building a domain from chunks as they arrive.

    Used by a migration's target, by restore, and by restore of a foreign
    image.  Memory stays bounded (``QUEUE_CHUNKS`` chunks queued); a driver
    that fails stops the feed with its own error; ``abandon`` cancels the
    build and destroys a domain it finished anyway (on a stream refused
    after its last chunk).
    """

    def __init__(self, driver: Driver, config: DomainConfig, name: str) -> None:
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(QUEUE_CHUNKS)
        self._build: asyncio.Future[Domain] = asyncio.ensure_future(
            driver.receive_stream(config, self._chunks(), name=name)
        )

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


TRANSFERS: dict[str, Transfer] = {t.kind: t for t in (PagedTransfer(), StreamTransfer())}


def transfer_for(obj: Domain | Driver) -> Transfer:
    """The transfer its driver declares."""
    try:
        return TRANSFERS[obj.transfer]
    except KeyError:
        raise DriverError(f"unknown transfer kind {obj.transfer!r} declared by {type(obj).__name__}") from None
