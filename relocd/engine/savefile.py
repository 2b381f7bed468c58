"""Save, checkpoint, restore and inspect (`xm save`, `xm save -c`, `xm restore`).

A save is a migration whose target is a file: the same record stream, behind
a file header and closed by a digest trailer (``savefile_format``).  The file
appears under its final name only by the last rename, after fsync; anything
that fails before leaves no file and the domain as it was.  A restore checks
the header, the trailer and CONFIG, and reserves memory and the domain's name,
before it creates anything; it checks the whole-file digest while the records
load into the paused domain, which runs only once the digest held (a stream
domain's file: before the build); if it fails midway it destroys what it
built.  Stream domains (Xen PV) and images another toolstack wrote
(``xl save``) go through the same flows.  What each kind writes between
CONFIG and COMMIT, and how it puts its domain back when a save fails, is its
transfer's (``Transfer.save``, ``transfer_save``), as ``Transfer.receive``
reads it back; foreign images are ``savefile_stream``'s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import time
import uuid as uuidlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

from relocd import __version__
from relocd.config.domain import config_from_sxp, config_to_sxp
from relocd.drivers.base import INCOMING_SUFFIX, PAGES, Domain, DomainConfig, DomainState, Driver
from relocd.engine.hooks import DomainHooks
from relocd.engine.journal import Journal
from relocd.engine.policy import PrecopyPolicy
from relocd.engine.reservation import ReservationRequest, check_reservation, find_unreachable_disks
from relocd.engine.result import Progress, no_progress
from relocd.engine.savefile_format import ChunkedDigest, FileHeader, Trailer
from relocd.engine.savefile_io import FileWriter, OpenSavefile, Verification, io_error
from relocd.engine.savefile_stream import (
    OpenForeign,
    checkpoint_refusal,
    no_driver_for,
    open_foreign,
)
from relocd.engine.source import SendOptions, SourceMigration
from relocd.engine.stream import PeerGone, RecordChannel
from relocd.engine.target import TargetContext
from relocd.engine.transfer import Landing, transfer_for
from relocd.engine.transfer_save import FileSave, Saving
from relocd.errors import ConfigError, ProtocolError, RelocdError, SaveFileError
from relocd.protocol.codec import DEFAULT_MAX_LENGTH, HEADER_SIZE, PAGES_FIXED_SIZE
from relocd.protocol.records import (
    Config,
    PagesHeader,
    Role,
    StreamChunk,
    VcpuState,
)
from relocd.protocol.state import Conversation
from relocd.units import PAGE_SIZE

log = structlog.get_logger("relocd.savefile")

Pfns = npt.NDArray[np.uint64]


@dataclasses.dataclass
class SaveResult:
    """What `relocd save` reports."""

    domain: str
    file: str
    checkpoint: bool
    status: str = "failed"
    bytes_written: int = 0
    pages: int = 0
    zero_pages: int = 0
    iterations: int = 0
    pause_ms: float = 0.0
    total_ms: float = 0.0
    error: str | None = None
    #: a stream domain's save: bytes of its driver's stream (pages stays 0)
    stream_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class RestoreResult:
    domain: str
    uuid: str
    file: str
    memory_mib: int
    pages: int = 0
    bytes_read: int = 0
    verified_memory: bool = False
    total_ms: float = 0.0
    details: dict[str, object] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class SaveControl:
    """What `relocd abort` may ask of a save in flight: nothing once the file is committed."""

    committed: bool = False


def temp_name(final: Path) -> Path:
    """Where a save writes until it is complete: hidden, same directory, never final-looking."""
    return final.with_name(f".{final.name}.{uuidlib.uuid4().hex[:8]}.partial")


def _hold_replaced(final: Path) -> int:
    """A descriptor pinning the file the final rename replaces (-1: none).

    Whoever drops the last reference to a replaced savefile frees its blocks
    and cached pages: most of a second for 1 GiB here, inside the rename.
    Held, that happens at this descriptor's close instead, off the save's path
    (``_release_later``).  O_PATH: nothing is read, a FIFO does not block.
    """
    flags = getattr(os, "O_PATH", 0)
    if not flags:
        return -1
    try:
        return os.open(final, flags | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return -1


def _release_later(fd: int) -> None:
    if fd >= 0:
        threading.Thread(target=os.close, args=(fd,), name="relocd-release-replaced", daemon=True).start()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _FileSender:
    """The send loop of a live migration (rounds, policy, progress), with a file for a target.

    Notes where each page's latest copy lands in the file, which is what a
    checkpoint's image digest is computed from.  ``PagedSave`` drives it
    (``transfer_save.PageSender``); its counts are the save's result.
    """

    def __init__(self, domain: Domain, channel: RecordChannel, writer: FileWriter, policy: PrecopyPolicy,
                 journal: Journal | None, progress: Progress, batch_pages: int) -> None:  # fmt: skip
        self.writer = writer
        self.locations: npt.NDArray[np.int64] = np.full(domain.npages, -1, dtype=np.int64)
        self.migration = SourceMigration(
            domain,
            channel,
            SendOptions(live=True, verify=False, policy=policy, batch_pages=batch_pages),
            journal=journal,  # type: ignore[arg-type]  # the send loop never journals
            migration_id=str(uuidlib.uuid4()),
            target=writer.path,
            progress=progress,
            on_batch=self._note_locations,
        )
        self.result = self.migration.result

    def _note_locations(self, data: npt.NDArray[np.uint64], zero: npt.NDArray[np.uint64]) -> None:
        # The PAGES record about to be written starts at writer.offset.
        payload_at = self.writer.offset + HEADER_SIZE + PAGES_FIXED_SIZE + 8 * (len(data) + len(zero))
        self.locations[data.astype(np.intp)] = payload_at + PAGE_SIZE * np.arange(len(data), dtype=np.int64)
        self.locations[zero.astype(np.intp)] = -1

    async def precopy(self) -> npt.NDArray[np.uint64]:
        return await self.migration.precopy()

    async def send_pfns(self, round_no: int, pfns: npt.NDArray[np.uint64]) -> tuple[int, int]:
        return await self.migration.send_pfns(round_no, pfns)


async def save_domain(
    domain: Domain,
    path: str | Path,
    *,
    checkpoint: bool,
    policy: PrecopyPolicy,
    journal: Journal | None = None,
    progress: Progress = no_progress,
    batch_pages: int = 1024,
    hooks: DomainHooks | None = None,
    control: SaveControl | None = None,
) -> SaveResult:
    """Write ``domain`` to ``path``; destroy it unless ``checkpoint``.  Raises RelocdError.

    On failure (or a cancel, e.g. `relocd abort`) the temporary file is gone
    and the domain runs (or stays paused) as it did before.  The rename that
    makes the file appear is the commit point (``control.committed``): from
    there the save completes, even if cancelled.
    """
    control = control or SaveControl()
    t0 = time.monotonic()
    hooks = hooks or DomainHooks()
    final = Path(path).absolute()
    result = SaveResult(domain=domain.name, file=str(final), checkpoint=checkpoint)
    transfer = transfer_for(domain)
    if checkpoint and not transfer.checkpoints:
        raise checkpoint_refusal(domain)
    if not final.parent.is_dir():
        raise SaveFileError(f"cannot save to {final}: no directory {final.parent}")
    if final.is_dir():
        raise SaveFileError(f"cannot save to {final}: it is a directory")
    tmp = temp_name(final)
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise io_error(str(final), "create", exc) from None
    digest = ChunkedDigest()
    writer = FileWriter(fd, str(final), digest)
    channel = RecordChannel(writer, Conversation(Role.SOURCE, savefile=True), max_frame=DEFAULT_MAX_LENGTH)
    sender = _FileSender(domain, channel, writer, policy, journal, progress, batch_pages)
    was_running = domain.state == DomainState.RUNNING
    save: FileSave | None = None
    try:
        cfg = await domain.read_config()
        header = FileHeader(
            name=cfg.name, uuid=cfg.uuid, memory_bytes=cfg.memory_bytes, vcpus=cfg.vcpus,
            driver=cfg.driver, writer=__version__, created_ns=time.time_ns(), checkpoint=checkpoint,
        )  # fmt: skip
        await writer.write([header.pack()])
        await channel.send(Config(config_to_sxp(cfg)))
        saving = Saving(
            domain=domain, config=cfg, channel=channel, writer=writer, policy=policy, progress=progress,
            hooks=hooks, checkpoint=checkpoint, was_running=was_running, sender=sender,
        )  # fmt: skip
        save = transfer.save(saving)
        saved = await save.run()
        result.iterations, result.pause_ms = saved.iterations, saved.pause_ms
        await progress(phase="sync")
        file_digest = await asyncio.to_thread(digest.finish)
        trailer = Trailer(stream_end=writer.offset, digest=file_digest)
        await writer.write([trailer.pack()])
        await asyncio.to_thread(os.fsync, fd)
        os.close(fd)
        fd = -1
        replaced = _hold_replaced(final)
        control.committed = True  # no abort from here: the file is the domain now
        try:
            os.rename(tmp, final)
        finally:
            _release_later(replaced)
    except BaseException as exc:
        await writer.settle()
        digest.cancel()
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        if save is not None:
            await save.undo()
        if isinstance(exc, OSError):
            raise io_error(str(final), "save to", exc) from None
        raise
    result.bytes_written = writer.offset
    result.stream_bytes = saved.stream_bytes
    result.pages = sender.result.pages_sent
    result.zero_pages = sender.result.zero_pages

    async def conclude() -> None:
        try:
            await asyncio.to_thread(_fsync_dir, final.parent)
        except OSError as exc:  # the file is complete and renamed; only the rename's durability is in doubt
            log.warning("could not sync the savefile's directory", file=str(final), error=str(exc))
        if not checkpoint:
            await domain.discard()  # saved: its memory may be freed after we answer
            await hooks.destroyed(domain)

    # Committed: a cancel must not leave the domain and its savefile both live.
    await asyncio.shield(asyncio.ensure_future(conclude()))
    if not checkpoint:
        result.pause_ms = round((time.monotonic() - saved.paused_at) * 1000, 3)
    result.status = "completed"
    result.total_ms = round((time.monotonic() - t0) * 1000, 3)
    log.info("domain saved", domain=domain.name, file=str(final), checkpoint=checkpoint,
             bytes=result.bytes_written, pause_ms=result.pause_ms)  # fmt: skip
    return result


# -- restore ---------------------------------------------------------------------


def check_savefile(path: str) -> OpenSavefile:
    """Open and fully verify a savefile (header, trailer, digest); the caller closes it."""
    opened = OpenSavefile.open(path)
    try:
        opened.verify()
    except BaseException:
        opened.close()
        raise
    return opened


async def inspect_savefile(path: str) -> dict[str, Any]:
    """The header of a savefile and whether its digest holds; restores nothing.

    ``transfer`` says what the records carry: "pages", or "stream" (a stream
    domain's driver stream).  An image another toolstack wrote (``xl
    save``) shows what it says about its domain; it has no digest to check
    (``digest_ok`` None).
    """
    foreign = await asyncio.to_thread(open_foreign, path)
    if foreign is not None:
        with foreign:
            info = foreign.info()
        info.update(file=str(Path(path).absolute()), transfer="stream", digest_ok=None, problem=None)
        return info
    opened = OpenSavefile.open(path)
    try:
        info = {"file": str(Path(path).absolute()), "size": opened.size}
        info.update(opened.header.to_json())
        try:
            await asyncio.to_thread(opened.verify)
            info["digest_ok"], info["problem"] = True, None
            info["transfer"] = await _transfer_of(opened)
        except SaveFileError as exc:
            info["digest_ok"], info["problem"] = False, exc.message
        return info
    finally:
        opened.close()


async def _transfer_of(opened: OpenSavefile) -> str | None:
    """"pages" or "stream", from the first records after STOP (None: not to be told)."""
    channel = opened.channel()
    try:
        for _ in range(64):
            record = await channel.recv()
            if isinstance(record, StreamChunk):
                return "stream"
            if isinstance(record, PagesHeader | VcpuState):
                return "pages"
    except (ProtocolError, PeerGone, SaveFileError):
        pass
    return None


async def restore_savefile(
    path: str,
    ctx: TargetContext,
    *,
    verify_memory: bool = False,
    progress: Progress = no_progress,
) -> RestoreResult:
    """Bring a saved domain back, running, exactly where it stopped.  Raises RelocdError.

    ``path`` is a relocd savefile, or an image another toolstack wrote that
    a driver package recognises (``xl save``'s, restored by the xen driver).
    """
    t0 = time.monotonic()
    await progress(phase="verify")
    foreign = await asyncio.to_thread(open_foreign, path)
    if foreign is not None:
        with foreign:
            result = await _restore_foreign(foreign, ctx, progress)
    else:
        result = await _restore_relocd(path, ctx, verify_memory, progress)
    result.total_ms = round((time.monotonic() - t0) * 1000, 3)
    log.info("domain restored", domain=result.domain, file=result.file, ms=result.total_ms)
    return result


async def _restore_relocd(path: str, ctx: TargetContext, verify_memory: bool, progress: Progress) -> RestoreResult:
    opened = await asyncio.to_thread(OpenSavefile.open, path)  # header and trailer: cheap, and first
    verification: Verification | None = None
    try:
        driver = ctx.drivers.get(opened.header.driver)
        if driver is not None and transfer_for(driver).kind == PAGES:
            # The page form loads into a paused domain while the digest is
            # checked; it runs only once the digest held (docs/savefile.md).
            verification = Verification(opened)
        else:
            # A driver's stream goes to the driver's own builder: check every byte first.
            await asyncio.to_thread(opened.verify)
        try:
            return await _load_relocd(opened, ctx, verification, verify_memory, progress)
        except SaveFileError:
            # A corrupted file fails the load in many ways (a CRC, a pfn out
            # of range, a record out of turn); the digest names the cause.
            if verification is not None and (problem := await verification.problem()) is not None:
                raise problem from None
            raise
    finally:
        if verification is not None:
            await verification.stop()
        opened.close()


async def _load_relocd(
    opened: OpenSavefile,
    ctx: TargetContext,
    verification: Verification | None,
    verify_memory: bool,
    progress: Progress,
) -> RestoreResult:
    """Reserve, build paused, replay the records, and run the domain once the digest held."""
    path = opened.path
    pages = stream_bytes = 0
    channel = opened.channel()
    try:
        first = await channel.recv()
        assert isinstance(first, Config)
        try:
            config = config_from_sxp(first.text)
        except ConfigError as exc:
            raise SaveFileError(f"{path}: bad domain config: {exc.message}") from None
        h = opened.header
        if (config.name, config.uuid, config.memory_bytes, config.driver) != (h.name, h.uuid, h.memory_bytes, h.driver):
            raise SaveFileError(f"{path}: header and domain config disagree")
        verified = False

        async def build(driver: Driver, rid: str) -> Domain:
            nonlocal verified, pages, stream_bytes

            def register(domain: Domain) -> None:
                ctx.incoming[rid] = domain

            landing = Landing(
                driver=driver, config=config, name=config.name + INCOMING_SUFFIX,
                reservations=ctx.reservations, reservation_id=rid, register=register,
            )  # fmt: skip
            received = await transfer_for(driver).receive(channel, landing)
            reader = channel.transport
            if getattr(reader, "pos", None) != getattr(reader, "end", None):
                raise ProtocolError("bytes after COMMIT")
            if verification is not None:
                await verification.check()  # nothing of the file is trusted before this
            pages, stream_bytes = received.pages, received.stream_bytes
            if transfer_for(driver).verifies_memory and received.digest is None:
                raise ProtocolError("stream ended without a memory digest")
            if verify_memory and received.digest is not None:
                await progress(phase="verify-memory")
                if not await received.memory_matches():
                    raise SaveFileError(f"{path}: restored memory does not match the saved digest")
                verified = True
            await received.load_state()
            return received.domain

        details = await _bring_up(path, config, ctx, build, progress)
    except PeerGone as exc:
        raise SaveFileError(exc.message) from None
    except ProtocolError as exc:
        raise SaveFileError(f"{path}: corrupted record stream: {exc.message}") from None
    if stream_bytes:
        details = {"stream_bytes": stream_bytes, **details}
    return RestoreResult(
        domain=config.name, uuid=config.uuid, file=str(Path(path).absolute()),
        memory_mib=config.memory_mib, pages=pages, bytes_read=channel.bytes_received,
        verified_memory=verified, details=details,
    )  # fmt: skip


async def _restore_foreign(foreign: OpenForeign, ctx: TargetContext, progress: Progress) -> RestoreResult:
    """An image another toolstack wrote: its driver's stream is a byte range of the file."""
    image = foreign.image
    config = image.config
    if image.driver not in ctx.drivers:
        raise no_driver_for(foreign.path, image)

    async def build(driver: Driver, rid: str) -> Domain:
        domain = await driver.receive_stream(
            config, foreign.chunks(), name=config.name + INCOMING_SUFFIX
        )
        ctx.incoming[rid] = domain
        assert isinstance(domain, Domain)
        return domain

    details = await _bring_up(foreign.path, config, ctx, build, progress)
    return RestoreResult(
        domain=config.name, uuid=config.uuid, file=str(Path(foreign.path).absolute()),
        memory_mib=config.memory_mib, bytes_read=foreign.size,
        details={"format": image.kind, "stream_bytes": image.stream_end - image.stream_start, **details},
    )  # fmt: skip


async def _bring_up(
    path: str,
    config: DomainConfig,
    ctx: TargetContext,
    build: Callable[[Driver, str], Awaitable[Domain]],
    progress: Progress,
) -> dict[str, object]:
    """Reserve room for ``config`` as an incoming migration would, ``build`` it paused, rename it, run it.

    Nothing is built unless the reservation holds (driver, name, uuid,
    memory); ``build`` registers its domain in ``ctx.incoming`` as soon as it
    exists, and whatever it left there is destroyed if anything fails.
    """
    driver = ctx.drivers.get(config.driver)
    if driver is None:
        raise SaveFileError(f"{path}: domain {config.name} needs driver {config.driver!r}, not available here")
    request = ReservationRequest.for_domain(config, live=False)
    domains = ctx.all_domains()
    check_reservation(
        request,
        await driver.capabilities(),
        max_memory=ctx.max_memory,
        reserved_bytes=ctx.reservations.reserved_bytes,
        existing_names={d.name for d in domains} | ctx.reservations.names,
        existing_uuids={d.config.uuid for d in domains} | ctx.reservations.uuids,
        unreachable_disks=await find_unreachable_disks(request, driver),
    )
    rid = f"restore-{uuidlib.uuid4()}"
    ctx.reservations.add(rid, request)
    ok = False
    try:
        await progress(phase="restore")
        domain = await build(driver, rid)
        await domain.rename(config.name)
        await ctx.hooks.before_resume(domain)
        await domain.resume()
        ok = True
        ctx.incoming.pop(rid, None)
        return await ctx.hooks.after_resume(domain)
    finally:
        half = ctx.incoming.pop(rid, None)
        if half is not None and not ok:
            try:
                await half.destroy()
                await ctx.hooks.destroyed(half)
            except RelocdError as exc:
                log.error("could not destroy a half-restored domain", domain=half.name, error=exc.message)
        ctx.reservations.release(rid)
