"""The file-side halves of the transfers: a save's records from after CONFIG to COMMIT.

A savefile is the record stream of a migration whose target is a file
(``savefile.py`` writes the header, CONFIG, the trailer, and owns the
temporary file).  What each kind sends there, and how it puts its domain
back when the save fails, is here, one object per kind, made by
``Transfer.save`` (``transfer.py``):

* ``PagedSave``: a checkpoint of a running domain is a live precopy into the
  file, then a short pause for the last dirty pages (written once the domain
  runs again) and a DIGEST of the image the file holds; anything else is
  stop-and-copy, the memory digest computed alongside.
* ``StreamSave``: the driver's own stream, non-live (``savefile_stream.py``
  shows the records), live for a checkpoint (the driver's suspend is then
  cancelled); no DIGEST, the stream carries its own checks.

They live apart from ``transfer.py`` to keep each module readable in one
sitting (together they would be some 550 lines).  The page side's send
loop (a ``SourceMigration`` with a file for a target, ``savefile``'s
``_FileSender``) is built by ``save_domain`` and comes in as
``Saving.sender``; its counts are the save's result.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import structlog

from relocd.drivers.base import Domain, DomainConfig
from relocd.engine.hooks import DomainHooks
from relocd.engine.pages import bitmap_to_pfns, memory_digest
from relocd.engine.policy import PrecopyPolicy
from relocd.engine.result import MigrationResult, Progress
from relocd.engine.savefile_io import FileWriter, WriteMode, image_digest
from relocd.engine.stream import RecordChannel
from relocd.errors import RelocdError
from relocd.protocol.records import (
    Commit,
    Digest,
    DigestAlgo,
    Stop,
    StreamChunk,
    VcpuState,
)

log = structlog.get_logger("relocd.savefile")  # the save's lines, wherever its kind's half runs

Pfns = npt.NDArray[np.uint64]


class PageSender(Protocol):
    """A live migration's send loop with a file for a target (``savefile._FileSender``)."""

    result: MigrationResult
    #: file offset of each page's latest copy, -1 for a zero page
    locations: npt.NDArray[np.int64]

    async def precopy(self) -> Pfns: ...

    async def send_pfns(self, round_no: int, pfns: Pfns) -> tuple[int, int]: ...


@dataclasses.dataclass
class Saving:
    """What a save hands its kind: the domain, and the file as a channel."""

    domain: Domain
    #: the whole config, as CONFIG carried it
    config: DomainConfig
    channel: RecordChannel
    writer: FileWriter
    policy: PrecopyPolicy
    progress: Progress
    hooks: DomainHooks
    checkpoint: bool
    #: the domain ran when the save began
    was_running: bool
    #: the page send loop (a stream domain's save leaves it unused)
    sender: PageSender


@dataclasses.dataclass
class Saved:
    """CONFIG..COMMIT written: what the save reports."""

    #: when the domain stopped (``time.monotonic()``)
    paused_at: float
    iterations: int
    #: the pause, where the domain ran again within the save (a checkpoint); else 0.0
    pause_ms: float = 0.0
    #: a stream domain's save: bytes of its driver's stream
    stream_bytes: int = 0


class FileSave:
    """One save's records after CONFIG, and what undoes them; see the module docstring."""

    def __init__(self, saving: Saving) -> None:
        self.saving = saving

    async def run(self) -> Saved:
        """From after CONFIG to COMMIT, into the file."""
        raise NotImplementedError

    async def undo(self) -> None:
        """The save failed (the file is already gone): the domain goes on as if never asked."""
        raise NotImplementedError


class PagedSave(FileSave):
    def __init__(self, saving: Saving) -> None:
        super().__init__(saving)
        #: we paused a running domain and have not resumed it
        self.paused = False
        #: the dirty log is on (precopy started it) and we have not stopped it
        self.logging = False

    async def run(self) -> Saved:
        s = self.saving
        if s.checkpoint and s.was_running:
            saved = await self._checkpoint()
        else:
            saved = await self._stop_and_copy()
        await s.channel.send(Commit())
        return saved

    async def _checkpoint(self) -> Saved:
        """Live: precopy into the file, then the last dirty pages while paused; DIGEST of the file's image."""
        s, domain, writer = self.saving, self.saving.domain, self.saving.writer
        writer.mode = WriteMode.COPY
        self.logging = True  # precopy() starts the log; we stop it
        dirty = await s.sender.precopy()
        await s.progress(phase="stop-and-copy")
        paused_at = time.monotonic()
        await domain.pause()
        self.paused = True
        final_dirty = await domain.dirty_log_fetch()
        pfns = np.union1d(dirty, bitmap_to_pfns(final_dirty, domain.npages)).astype(np.uint64)
        round_no = s.sender.result.iterations + 1
        writer.mode = WriteMode.DEFER  # copy while paused, write once running again
        await s.channel.send(Stop(round_no))
        await s.sender.send_pfns(round_no, pfns)
        blob = await domain.save_state()
        await domain.resume()
        self.paused = False
        pause_ms = round((time.monotonic() - paused_at) * 1000, 3)
        await domain.dirty_log_stop()
        self.logging = False
        writer.mode = WriteMode.DIRECT
        await writer.flush()
        await s.channel.send(VcpuState(s.config.driver, blob))
        await s.progress(phase="digest")
        value = await asyncio.to_thread(image_digest, writer.fd, s.sender.locations)
        await s.channel.send(Digest(DigestAlgo.BLAKE3, value))
        return Saved(paused_at, round_no, pause_ms=pause_ms)

    async def _stop_and_copy(self) -> Saved:
        # The domain stays paused, memory is stable, so pages go from guest
        # memory to the file without a copy and the memory digest is computed
        # alongside.
        s, domain = self.saving, self.saving.domain
        paused_at = time.monotonic()
        if s.was_running:
            await domain.pause()
            self.paused = True
            await s.hooks.paused(domain)
        mem_digest = asyncio.ensure_future(asyncio.to_thread(memory_digest, domain.memory(), DigestAlgo.BLAKE3))
        try:
            await s.progress(phase="stop-and-copy")
            await s.channel.send(Stop(1))
            await s.sender.send_pfns(1, np.arange(domain.npages, dtype=np.uint64))
            blob = await domain.save_state()
            await s.channel.send(VcpuState(s.config.driver, blob))
        finally:
            value = await mem_digest
        await s.channel.send(Digest(DigestAlgo.BLAKE3, value))
        return Saved(paused_at, 1)

    async def undo(self) -> None:
        s, domain = self.saving, self.saving.domain
        if self.logging:
            try:
                await domain.dirty_log_stop()
            except RelocdError:
                pass
        if self.paused:
            await domain.resume()
            if not s.checkpoint:
                await s.hooks.resumed_here(domain)


class StreamSave(FileSave):
    """STOP(1), the driver's stream, VCPU_STATE, COMMIT.

    ``undo`` after a failure brings the domain back the driver's way (its
    ``undo_send``, as a migration's rollback does): a suspended stream
    domain is not resumed by ``resume()``.
    """

    def __init__(self, saving: Saving) -> None:
        super().__init__(saving)
        self.stream_bytes = 0
        #: send_stream was entered: the driver may have suspended the domain
        self.started = False
        self._sink_error: Exception | None = None

    async def run(self) -> Saved:
        # Non-live: the driver suspends the domain itself, and the stream
        # carries the state and its own checks (no DIGEST).  A checkpoint
        # (``xl save -c``) is the driver's live save, rounds decided by the
        # save's policy, and once the guest has suspended and the last of it
        # is in the stream, ``undo_send`` cancels the suspend: it runs on.
        s = self.saving
        domain, channel = s.domain, s.channel
        dom: Any = domain
        live = s.checkpoint and s.was_running
        paused_at = time.monotonic()

        async def sink(chunk: bytes) -> None:
            try:
                await channel.send(StreamChunk(chunk))
            except Exception as exc:
                self._sink_error = exc  # the cause; the driver reports only that its receiver failed
                raise
            self.stream_bytes += len(chunk)

        rounds = 0

        async def on_round(decision: Any) -> None:
            nonlocal paused_at, rounds
            rounds += 1
            if getattr(decision, "stop_reason", None) is not None:
                paused_at = time.monotonic()  # the last round: the guest suspends next
                await s.progress(phase="stop-and-copy")

        await s.progress(phase="precopy" if live else "stop-and-copy")
        await channel.send(Stop(1))
        self.started = True
        try:
            await dom.send_stream(live, s.policy, sink, on_round)
        except Exception:
            if self._sink_error is not None:
                raise self._sink_error from None
            raise
        pause_ms = 0.0
        if s.checkpoint:
            await domain.undo_send()
            self.started = False
            pause_ms = round((time.monotonic() - paused_at) * 1000, 3)
        else:
            await s.hooks.paused(domain)
        await channel.send(VcpuState(domain.config.driver, b""))
        await channel.send(Commit())
        return Saved(paused_at, rounds + 1, pause_ms=pause_ms, stream_bytes=self.stream_bytes)

    async def undo(self) -> None:
        if not self.started:
            return
        domain = self.saving.domain
        try:
            await domain.undo_send()  # idempotent, as for a migration's rollback
            self.started = False
            if not self.saving.checkpoint:
                await self.saving.hooks.resumed_here(domain)
        except RelocdError as exc:
            log.error("save failed and the domain could not be resumed", domain=domain.name, error=exc.message)
