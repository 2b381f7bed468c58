"""The sim driver with real domain processes under tmp_path."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import uuid as uuidlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest

from relocd.drivers import load_driver
from relocd.drivers.base import DomainConfig, DomainState
from relocd.drivers.domproc import process_alive
from relocd.drivers.sim import SimDomain, SimDriver, invariant
from relocd.errors import ConfigError, DomainExists, DriverError

MIB = 64
NPAGES = MIB * 256
TABLE_PAGES = invariant.table_pages(NPAGES)


def kill_leftovers(state_dir: Path) -> None:
    """Safety net: whatever a failed test left running dies here."""
    for record in (state_dir / "sim").glob("*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            pid = int(json.loads(record.read_text())["pid"])
            if process_alive(pid, record.stem):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    kill_leftovers(tmp_path)


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


def config(name: str, workload: str = "idle", mib: int = MIB) -> DomainConfig:
    return DomainConfig(name=name, memory_mib=mib, workload=workload)


def digest(domain: SimDomain) -> bytes:
    return hashlib.blake2b(domain.memory(), digest_size=16).digest()


def dirty_pages(bitmap: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(bitmap.view(np.uint8), bitorder="little"))


async def wait_for_progress(domain: SimDomain, past: int, timeout: float = 5.0) -> dict[str, int]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        stats = await domain.stats()
        if stats["pages_written"] > past:
            return stats
        assert asyncio.get_running_loop().time() < deadline, f"no progress past {past}: {stats}"
        await asyncio.sleep(0.02)


async def test_load_driver_gives_a_sim_driver(state_dir: Path) -> None:
    assert isinstance(load_driver("sim", state_dir), SimDriver)


async def test_hotset_domain_runs_and_dirties_only_its_hot_set(driver: SimDriver) -> None:
    domain = await driver.create(config("hot", "hotset:size=4MiB,rate=100MB/s"))
    assert isinstance(domain, SimDomain) and driver.lookup("hot") is domain
    assert domain.state is DomainState.RUNNING
    assert len(domain.memory()) == NPAGES * 4096 and not domain.memory().readonly
    first = await wait_for_progress(domain, 0)
    second = await wait_for_progress(domain, first["pages_written"])
    assert second["ticks"] > first["ticks"] and second["running"] is True

    await domain.dirty_log_start()
    await asyncio.sleep(0.1)
    bitmap = await domain.dirty_log_fetch()
    assert bitmap.dtype == np.uint64 and len(bitmap) == NPAGES // 64
    pages = dirty_pages(bitmap)
    hot_end = TABLE_PAGES + (4 << 20) // 4096
    assert len(pages) > 50
    assert pages.max() < hot_end  # the hot set plus the table pages that describe it
    assert (pages >= TABLE_PAGES).sum() > 40  # data pages, not just table pages

    await domain.pause()
    await domain.dirty_log_fetch()
    assert len(dirty_pages(await domain.dirty_log_fetch())) == 0  # nothing written after pause
    await domain.dirty_log_stop()
    with pytest.raises(DriverError, match="not started"):
        await domain.dirty_log_fetch()
    assert await domain.check_invariant() is None


async def test_pause_really_stops_writes(driver: SimDriver) -> None:
    domain = await driver.create(config("busy", "uniform:rate=200MB/s"))
    before = digest(domain)
    await asyncio.sleep(0.1)
    assert digest(domain) != before  # the test could fail: memory does move while running
    await domain.pause()
    assert domain.state is DomainState.PAUSED
    paused = digest(domain)
    written = (await domain.stats())["pages_written"]
    await asyncio.sleep(0.1)
    assert digest(domain) == paused
    assert (await domain.stats())["pages_written"] == written
    await domain.resume()
    await wait_for_progress(domain, written)


async def test_state_moves_into_a_domain_created_empty(driver: SimDriver) -> None:
    source = await driver.create(config("src", "hotset:size=8MiB,rate=100MB/s"))
    await wait_for_progress(source, 1000)
    with pytest.raises(DriverError, match="paused"):
        await source.save_state()
    await source.pause()
    saved = await source.stats()
    blob = await source.save_state()
    assert json.loads(blob)["driver"] == "sim"

    target_config = source.config.model_copy(update={"name": "src--incoming", "uuid": str(uuidlib.uuid4())})
    target = await driver.create(target_config, start=False)
    assert target.state is DomainState.PAUSED
    assert not np.frombuffer(target.memory(), dtype=np.uint64).any()  # empty, waiting for pages
    target.memory()[:] = source.memory()
    with pytest.raises(DriverError, match="not saved by the sim driver"):
        await target.load_state(b'{"driver": "kvm", "format": 1}')
    await target.load_state(blob)
    loaded = await target.stats()
    assert (loaded["ticks"], loaded["pages_written"]) == (saved["ticks"], saved["pages_written"])
    assert await target.check_invariant() is None

    await source.destroy()
    await target.rename("src")
    await target.resume()
    moved_on = await wait_for_progress(target, saved["pages_written"])
    assert moved_on["ticks"] > saved["ticks"]
    assert await target.check_invariant() is None  # pauses for the check, resumes after
    assert (await target.stats())["running"] is True


async def test_corruption_is_seen_through_the_daemons_view(driver: SimDriver) -> None:
    domain = await driver.create(config("victim"))
    await domain.pause()
    assert await domain.check_invariant() is None
    domain.memory()[(TABLE_PAGES + 10) * 4096 + 100] ^= 0xFF
    report = await domain.check_invariant()
    assert report is not None and f"page {TABLE_PAGES + 10} is torn" in report


async def test_restarted_daemon_finds_its_domains(state_dir: Path) -> None:
    first = SimDriver(state_dir)
    await first.start()
    domain = await first.create(config("survivor", "sweep:rate=50MB/s"))
    pid = domain.pid
    await domain.rename("survivor-renamed")
    progress = await wait_for_progress(domain, 100)
    await first.close()  # the daemon goes away, the domain does not
    assert first.domains() == []
    assert process_alive(pid, domain.config.uuid)

    second = SimDriver(state_dir)
    try:
        await second.start()
        found = second.lookup("survivor-renamed")
        assert isinstance(found, SimDomain) and found.pid == pid
        assert found.config.uuid == domain.config.uuid
        await wait_for_progress(found, progress["pages_written"])  # continues, not restarted
        await found.pause()
        assert await found.check_invariant() is None
    finally:
        for d in second.domains():
            await d.destroy()


async def test_dead_domains_are_cleaned_up_on_start(state_dir: Path) -> None:
    first = SimDriver(state_dir)
    await first.start()
    domain = await first.create(config("doomed"))
    await first.close()
    os.kill(domain.pid, signal.SIGKILL)
    for _ in range(200):
        if not process_alive(domain.pid, domain.config.uuid):
            break
        await asyncio.sleep(0.01)
    second = SimDriver(state_dir)
    await second.start()
    assert second.domains() == []
    assert list((state_dir / "sim").iterdir()) in ([], [state_dir / "sim" / f"{domain.config.uuid}.log"])


async def test_destroy_stops_the_process_and_removes_files(driver: SimDriver, state_dir: Path) -> None:
    domain = await driver.create(config("gone", "uniform:rate=10MB/s"))
    assert sorted(p.suffix for p in (state_dir / "sim").iterdir()) == [".json", ".log", ".sock"]
    await domain.destroy()
    assert not process_alive(domain.pid, domain.config.uuid)
    assert list((state_dir / "sim").iterdir()) == []
    assert driver.domains() == []
    await domain.destroy()  # idempotent
    with pytest.raises(DriverError):
        domain.memory()
    with pytest.raises(DriverError, match="destroyed"):
        await domain.pause()


async def test_create_refuses_bad_requests(driver: SimDriver, state_dir: Path) -> None:
    with pytest.raises(ConfigError, match="unknown kind"):
        await driver.create(config("bad", "thrash"))
    await driver.create(config("one"))
    with pytest.raises(DomainExists):
        await driver.create(config("one"))
    with pytest.raises(DriverError, match="driver"):
        await driver.create(DomainConfig(name="two", memory_mib=1, driver="kvm"))
    two = await driver.create(config("two", mib=1))
    with pytest.raises(DomainExists):
        await two.rename("one")
    with pytest.raises(ConfigError):
        await two.rename("no spaces allowed")
    assert len(list((state_dir / "sim").glob("*.json"))) == 2


async def test_capabilities_describe_this_host(driver: SimDriver) -> None:
    caps = await driver.capabilities()
    assert caps.driver == "sim" and caps.free_memory_bytes > 0 and caps.max_vcpus >= 1
    assert caps.cpu_features or not Path("/proc/cpuinfo").exists()


def test_domain_process_exits_cleanly_when_setup_fails(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "relocd.drivers.sim.process", "--socket", str(tmp_path / "no" / "such.sock"),
            "--uuid", str(uuidlib.uuid4()), "--memory-bytes", str(1 << 20)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, timeout=30)
    assert done.returncode == 1
    assert b"domain setup failed" in done.stderr and b"Traceback" not in done.stderr


async def test_discard_is_gone_at_once_and_its_process_soon_after(driver: SimDriver, state_dir: Path) -> None:
    """discard (a handed-over or saved copy): out of the driver and its files at once; the exit in the background."""
    domain = await driver.create(config("handed", "uniform:rate=10MB/s"))
    await domain.pause()
    await domain.discard()
    assert driver.lookup("handed") is None
    assert not (state_dir / "sim" / f"{domain.config.uuid}.json").exists()
    await asyncio.to_thread(driver.wait_reaped)
    assert not process_alive(domain.pid, domain.config.uuid)
    await domain.destroy()  # idempotent after a discard
