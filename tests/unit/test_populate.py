"""Guest memory populated in the background (drivers/populate.py), not inside the reservation.

No timed assertions: what is checked is the mechanism -- right after
``create(start=False)`` guest memory is not resident (nobody populated it
synchronously) while worker threads are at it, the domain process need not
have answered yet, and ``load_state`` (before the target says PREPARED)
finds every page there and the process up, or fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import mmap
import os
import signal
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from relocd.drivers import domproc, populate
from relocd.drivers.base import DomainConfig, DomainState
from relocd.drivers.domproc import process_alive
from relocd.drivers.sim import SimDriver
from relocd.engine.journal import Journal
from relocd.engine.policy import XendPolicy
from relocd.engine.reservation import ReservationTable
from relocd.engine.source import SendOptions, SourceMigration, new_migration_id
from relocd.engine.stream import RecordChannel, memory_pipe
from relocd.engine.target import TargetContext, TargetSession
from relocd.errors import DriverError
from relocd.protocol.records import Role
from relocd.protocol.state import Conversation

PAGE = mmap.PAGESIZE
CHUNK = 64 * PAGE


@contextlib.contextmanager
def memfd_area(nbytes: int) -> Iterator[mmap.mmap]:
    fd = os.memfd_create("relocd-test-populate", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, nbytes)
        area = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    try:
        yield area
    finally:
        area.close()


# --------------------------------------------------------------------- the populator alone


def test_populator_makes_every_page_resident_and_changes_none() -> None:
    with memfd_area(10 * CHUNK + 3 * PAGE) as area:  # a short last chunk too
        assert not populate.resident(area).any()
        area[5 * PAGE : 5 * PAGE + 4] = b"kept"  # written "by the stream" before population
        pop = populate.Populator(area, threads=3, chunk_bytes=CHUNK).start()
        assert pop.wait(30)
        pop.finish()
        assert populate.resident(area).all()
        assert area[5 * PAGE : 5 * PAGE + 4] == b"kept"
        assert pop.populated + pop.skipped == pop.nchunks
        area.close()  # the populator let go of the mapping


def test_chunks_the_stream_reached_first_are_skipped() -> None:
    with memfd_area(8 * CHUNK) as area:
        for chunk in range(3):  # the receive cursor is past the first three chunks
            area[chunk * CHUNK : (chunk + 1) * CHUNK] = b"\x01" * CHUNK
        pop = populate.Populator(area, threads=1, chunk_bytes=CHUNK).start()
        assert pop.wait(30)
        assert (pop.skipped, pop.populated) == (3, 5)
        pop.finish()
        assert populate.resident(area).all()


def test_finish_fills_a_skipped_chunk_the_stream_only_ended() -> None:
    """Skipping looks at a chunk's last page only: finish checks the rest of such a chunk."""
    with memfd_area(4 * CHUNK) as area:
        area[3 * CHUNK - PAGE : 3 * CHUNK - PAGE + 1] = b"x"  # only chunk 2's last page is there
        pop = populate.Populator(area, threads=1, chunk_bytes=CHUNK).start()
        assert pop.wait(30)
        assert pop.skipped == 1 and not populate.resident(area).all()
        pop.finish()
        assert populate.resident(area).all()


def test_finish_fills_what_a_stopped_populator_left() -> None:
    with memfd_area(8 * CHUNK) as area:
        pop = populate.Populator(area, threads=1, chunk_bytes=CHUNK)
        gate = threading.Event()
        pop.before_chunk = lambda offset: gate.wait(5) if offset else None
        pop.start()
        while pop.populated == 0:  # chunk 0 done, the worker waits at chunk 1
            threading.Event().wait(0.01)
        pop._stop.set()  # what stop() does first; the worker ends chunk 1 and takes no other
        gate.set()
        pop.stop()
        assert not populate.resident(area).all()  # stopped part way
        pop.finish()
        assert populate.resident(area).all()


def test_without_populate_advice_pages_are_read_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernels before 5.14 answer EINVAL: one byte of each page is read instead."""

    def old_kernel(addr: int, length: int, advice: int) -> None:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    monkeypatch.setattr(populate, "madvise", old_kernel)
    monkeypatch.setattr(populate, "_no_populate_advice", False)
    with memfd_area(4 * CHUNK) as area:
        area[PAGE : PAGE + 2] = b"hi"
        pop = populate.Populator(area, threads=2, chunk_bytes=CHUNK).start()
        pop.finish()
        assert populate.resident(area).all()
        assert area[PAGE : PAGE + 2] == b"hi"
        assert populate._no_populate_advice


def test_a_failed_population_is_an_error_at_finish(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_memory(addr: int, length: int, advice: int) -> None:
        raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))

    monkeypatch.setattr(populate, "madvise", no_memory)
    with memfd_area(4 * CHUNK) as area:
        pop = populate.Populator(area, threads=2, chunk_bytes=CHUNK).start()
        with pytest.raises(DriverError, match="could not set aside guest memory"):
            pop.finish()


# --------------------------------------------------------------------- the sim driver


def kill_leftovers(state_dir: Path) -> None:
    for record in state_dir.rglob("sim/*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            pid = int(json.loads(record.read_text())["pid"])
            if process_alive(pid, record.stem):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
async def driver(state_dir: Path) -> AsyncIterator[SimDriver]:
    drv = SimDriver(state_dir)
    await drv.start()
    try:
        yield drv
    finally:
        for domain in drv.domains():
            with contextlib.suppress(Exception):
                await domain.destroy()
        kill_leftovers(state_dir)


@pytest.fixture
def held_population(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Population waits for this event: what create returns meanwhile was not populated by anyone."""
    gate = threading.Event()
    real = populate.populate_range

    def held(area: mmap.mmap, base: int, offset: int, length: int, *, write: bool = True) -> None:
        gate.wait(30)
        real(area, base, offset, length, write=write)

    monkeypatch.setattr(populate, "populate_range", held)
    try:
        yield gate
    finally:
        gate.set()


async def test_a_paused_build_leaves_memory_to_background_threads(
    driver: SimDriver, held_population: threading.Event
) -> None:
    mib = 256
    domain = await driver.create(DomainConfig(name="incoming", memory_mib=mib), start=False)
    populator = domain._populator
    assert populator is not None and populator.running  # handed to worker threads...
    area = domain._memory
    assert area is not None
    assert populate.resident(area).sum() == 0  # ...and neither the domain process nor create touched a page
    held_population.set()
    await domain.memory_set_aside()
    assert domain._populator is None
    assert populate.resident(area).all()  # all of it is there before the state loads
    assert bytes(domain.memory()[: 1 << 20]) == bytes(1 << 20)


async def test_a_booted_domain_is_not_populated_by_the_daemon(driver: SimDriver) -> None:
    domain = await driver.create(DomainConfig(name="running", memory_mib=16))
    assert domain._populator is None
    await domain.memory_set_aside()  # nothing to wait for


async def test_load_state_fails_when_the_memory_cannot_be_had(
    driver: SimDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = await driver.create(DomainConfig(name="src", memory_mib=16))
    await source.pause()
    blob = await source.save_state()

    def no_memory(addr: int, length: int, advice: int) -> None:
        raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))

    monkeypatch.setattr(populate, "madvise", no_memory)
    incoming = await driver.create(DomainConfig(name="dst", memory_mib=16), start=False)
    with pytest.raises(DriverError, match="could not set aside memory of domain dst"):
        await incoming.load_state(blob)
    assert incoming.state == DomainState.PAUSED
    await incoming.destroy()


# --------------------------------------------------------------------- the domain process comes up meanwhile


@pytest.fixture
def held_start(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """A paused build's wait for its domain process to serve waits for this event too."""
    gate = threading.Event()
    real = domproc.wait_serving

    def held(popen: subprocess.Popen[bytes], **kwargs: Any) -> None:
        if threading.current_thread().name.startswith("start-"):  # not a booted domain's spawn
            gate.wait(30)
        real(popen, **kwargs)

    monkeypatch.setattr(domproc, "wait_serving", held)
    try:
        yield gate
    finally:
        gate.set()


async def test_a_paused_build_returns_before_its_process_answers(
    driver: SimDriver, held_start: threading.Event
) -> None:
    source = await driver.create(DomainConfig(name="src", memory_mib=16))
    await source.pause()
    blob = await source.save_state()
    incoming = await driver.create(DomainConfig(name="dst", memory_mib=16), start=False)
    assert not incoming.started and incoming.state == DomainState.PAUSED
    incoming.memory()[1 << 20 : (1 << 20) + 5] = b"early"  # pages land before the process is up
    busy = DomainConfig(name="dst", uuid=incoming.config.uuid, memory_mib=16, workload="uniform:rate=20MB/s")
    await incoming.configure(busy)  # does not wait for the process either
    assert incoming.config.workload == busy.workload
    held_start.set()
    await incoming.load_state(blob)
    assert incoming.started
    assert bytes(incoming.memory()[1 << 20 : (1 << 20) + 5]) == b"early"  # the process kept what had landed
    await incoming.resume()
    for _ in range(200):
        if (await incoming.stats())["pages_written"] > 0:
            break
        await asyncio.sleep(0.02)
    assert (await incoming.stats())["pages_written"] > 0  # it learned the workload when it answered
    await incoming.pause()


async def test_a_paused_build_whose_process_never_serves_fails_at_its_first_request(
    driver: SimDriver, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(SimDriver, "_process_options", lambda self, config: ["--no-such-option"])
    incoming = await driver.create(DomainConfig(name="dst", memory_mib=16), start=False)
    with pytest.raises(DriverError, match="domain dst: domain process exited with status 2"):
        await incoming.load_state(b"{}")
    with pytest.raises(DriverError, match="exited with status 2"):
        await incoming.pause()  # every later request says so too
    await incoming.destroy()
    assert list((state_dir / "sim").glob(f"{incoming.config.uuid}.*")) == []


async def test_destroying_a_paused_build_before_its_process_answers(
    driver: SimDriver, state_dir: Path, held_start: threading.Event
) -> None:
    incoming = await driver.create(DomainConfig(name="dst", memory_mib=16), start=False)
    pid = incoming.pid
    assert not incoming.started
    await incoming.destroy()
    assert not process_alive(pid, incoming.config.uuid)
    assert list((state_dir / "sim").glob(f"{incoming.config.uuid}.*")) == []
    assert driver.lookup("dst") is None


# --------------------------------------------------------------------- a migration


async def test_a_target_that_cannot_populate_fails_before_prepared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hosts = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        drv = SimDriver(tmp_path / name)
        await drv.start()
        journal = Journal(tmp_path / name / "journal.sqlite")
        ctx = TargetContext(drivers={"sim": drv}, reservations=ReservationTable(30), journal=journal)
        hosts.append((drv, journal, ctx))
    (a, a_journal, _), (b, b_journal, b_ctx) = hosts
    try:
        await a.create(DomainConfig(name="vm", memory_mib=16, workload="uniform:rate=20MB/s"))

        def no_memory(addr: int, length: int, advice: int) -> None:
            raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))

        monkeypatch.setattr(populate, "madvise", no_memory)
        src_t, dst_t = memory_pipe()
        src = RecordChannel(src_t, Conversation(Role.SOURCE), max_frame=16 << 20)
        dst = RecordChannel(dst_t, Conversation(Role.TARGET), max_frame=16 << 20)
        dom = a.lookup("vm")
        assert dom is not None
        mig = SourceMigration(
            dom, src, SendOptions(live=False, verify=True, policy=XendPolicy()),
            journal=a_journal, migration_id=new_migration_id(), target="b",
        )  # fmt: skip
        result, _ = await asyncio.gather(mig.run(), TargetSession(dst, b_ctx, peer="a").run())
        assert result.status == "rolled-back"
        assert "could not set aside" in (result.error or "")
        kept = a.lookup("vm")
        assert kept is not None and kept.state == DomainState.RUNNING  # the usual rollback
        assert b.domains() == []
        assert len(b_ctx.reservations) == 0
    finally:
        for drv, journal, _ in hosts:
            for d in drv.domains():
                await d.destroy()
            await drv.close()
            journal.close()
        kill_leftovers(tmp_path)


def test_populated_pages_read_as_zero() -> None:
    with memfd_area(2 * CHUNK) as area:
        populate.Populator(area, threads=2, chunk_bytes=CHUNK).start().finish()
        assert not np.frombuffer(area, dtype=np.uint64).any()
