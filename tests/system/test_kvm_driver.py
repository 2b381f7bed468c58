"""The kvm driver against the real /dev/kvm: guests run, dirty log, pause, state, restart, destroy.

Skipped (with the reason) where /dev/kvm is missing or unusable, as the kernel
itself answers (conftest's ``needs_kvm``, no relocd code); as root with
/dev/kvm present those are failures, and so is relocd failing to run a guest
where the kernel says KVM works.
Every domain a test creates is destroyed by the fixture, even on failure,
and any VMM process left behind is killed by pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest

from relocd.drivers import domproc
from relocd.drivers.base import DomainConfig, DomainState
from relocd.drivers.kvm import KvmDriver, kvm_usable, layout, state
from relocd.errors import DriverError
from relocd.units import PAGE_SIZE


@functools.cache
def kvm_unavailable() -> str | None:
    """What stops relocd's own KVM code running a guest to its first exit, or None.

    Asked only once the kernel has said /dev/kvm works: then any answer here is a failure, not a skip.
    """
    problem = kvm_usable()
    if problem:
        return f"kvm not usable: {problem}"
    try:
        from relocd.drivers.kvm import ioctls
        from relocd.drivers.kvm.vm import GuestVm, KvmSystem

        system = KvmSystem()
        fd = os.memfd_create("relocd-kvm-probe")
        try:
            os.ftruncate(fd, 4 << 20)
            vm = GuestVm(system, fd, 4 << 20, 1, manual_protect=False)
            try:
                code = layout.CODE_ADDR
                mem = memoryview(vm.memory)
                layout.write_boot_image(mem, b"\xe6\x11", layout.WorkloadKind.IDLE, 0, 0, 1)  # out 0x11, al
                del mem
                vm.vcpus[0].enter_long_mode()
                ioctls.ioctl(vm.vcpus[0].fd, ioctls.KVM_RUN)
                reason = vm.vcpus[0].run.exit_reason
                if reason != ioctls.KVM_EXIT_IO:
                    return f"kvm cannot run a long-mode guest here (exit reason {reason} at {code:#x})"
            finally:
                vm.close()
        finally:
            os.close(fd)
            system.close()
    except OSError as exc:
        return f"kvm cannot run a guest here: {exc}"
    return None


Factory = Callable[..., KvmDriver]


@pytest.fixture
async def kvm_drivers(tmp_path: Path, needs_kvm: None) -> AsyncIterator[Factory]:
    """KvmDriver(state_dir) per name; at teardown every domain is destroyed and stray VMMs killed."""
    problem = kvm_unavailable()
    if problem:
        pytest.fail(f"/dev/kvm works (the kernel answers KVM API 12), but relocd's KVM code says: {problem}")
    made: list[KvmDriver] = []

    def make(host: str, dirty_mode: str = "clear") -> KvmDriver:
        driver = KvmDriver(tmp_path / host, dirty_mode=dirty_mode)
        made.append(driver)
        return driver

    try:
        yield make
    finally:
        for driver in made:
            for domain in driver.domains():
                with contextlib.suppress(Exception):
                    await domain.destroy()
        for record in tmp_path.glob("*/kvm/*.json"):
            with contextlib.suppress(Exception):
                pid = int(json.loads(record.read_text())["pid"])
                if domproc.process_alive(pid, record.stem):
                    os.kill(pid, signal.SIGKILL)


def config(name: str, workload: str = "uniform:rate=20MB/s", mib: int = 16, vcpus: int = 1) -> DomainConfig:
    return DomainConfig(name=name, memory_mib=mib, vcpus=vcpus, driver="kvm", workload=workload)


def bits(bitmap: np.ndarray) -> np.ndarray:
    """Page numbers set in a KVM dirty bitmap (bit i of word i // 64 = page i)."""
    return np.flatnonzero(np.unpackbits(bitmap.view(np.uint8), bitorder="little"))


def gentab(memory: memoryview) -> np.ndarray:
    ctl = layout.read_ctl(memory)
    return np.frombuffer(memory, dtype=np.uint64, count=ctl["ndata"], offset=ctl["gentab"]).copy()


async def test_guest_runs_and_its_counters_advance(kvm_drivers: Factory) -> None:
    driver = kvm_drivers("a")
    dom = await driver.create(config("busy"))
    idle = await driver.create(config("idle", workload="idle"))
    assert dom.state is DomainState.RUNNING
    first, first_idle = await dom.stats(), await idle.stats()
    await asyncio.sleep(0.4)
    later, later_idle = await dom.stats(), await idle.stats()
    assert later["crashed"] is None, later["crashed"]
    assert later["ticks"] > first["ticks"]
    assert later["pages_written"] > first["pages_written"]
    assert later_idle["ticks"] > first_idle["ticks"]
    assert later_idle["pages_written"] == first_idle["pages_written"]
    assert await dom.check_invariant() is None
    assert dom.state is DomainState.RUNNING  # the check paused and resumed it


@pytest.mark.parametrize("dirty_mode", ["get", "clear"])
async def test_dirty_log_reports_every_written_page(kvm_drivers: Factory, dirty_mode: str) -> None:
    dom = await kvm_drivers("a", dirty_mode).create(config("d"))
    assert (await dom.stats())["dirty_mode"] == dirty_mode
    mem = dom.memory()
    await dom.pause()
    await dom.dirty_log_start()
    before = gentab(mem)
    await dom.resume()
    await asyncio.sleep(0.3)
    await dom.pause()
    dirty = set(bits(await dom.dirty_log_fetch()).tolist())
    ctl = layout.read_ctl(mem)
    written = np.flatnonzero(gentab(mem) != before) + ctl["data_start"]
    assert written.size > 10
    assert set(written.tolist()) <= dirty
    assert layout.CTL_ADDR // PAGE_SIZE in dirty
    assert ctl["gentab"] // PAGE_SIZE + int(np.flatnonzero(gentab(mem) != before)[0]) // 512 in dirty
    assert bits(await dom.dirty_log_fetch()).size == 0  # fetched means cleared
    await dom.dirty_log_stop()


async def test_pause_stops_every_write(kvm_drivers: Factory) -> None:
    dom = await kvm_drivers("a").create(config("p", workload="sweep:rate=50MB/s"))
    await dom.dirty_log_start()
    await asyncio.sleep(0.2)
    await dom.pause()
    assert dom.state is DomainState.PAUSED
    await dom.dirty_log_fetch()
    snapshot = bytes(dom.memory())
    stats = await dom.stats()
    await asyncio.sleep(0.3)
    assert bits(await dom.dirty_log_fetch()).size == 0
    assert bytes(dom.memory()) == snapshot
    assert (await dom.stats())["pages_written"] == stats["pages_written"]
    assert await dom.check_invariant() is None


async def test_live_migration_between_two_vms_continues_the_guest(kvm_drivers: Factory) -> None:
    """Precopy by dirty log into a start=False VM, then state: the copy is exact and the guest goes on."""
    cfg = config("m", workload="sweep:rate=20MB/s", vcpus=2)
    src = await kvm_drivers("src").create(cfg)
    dst = await kvm_drivers("dst").create(cfg, start=False)
    assert dst.state is DomainState.PAUSED
    src_mem, dst_mem = src.memory(), dst.memory()
    assert not any(dst_mem[: 1 << 20])  # empty until pages arrive
    await asyncio.sleep(0.2)
    await src.dirty_log_start()
    dst_mem[:] = src_mem  # round 1 while the guest runs
    for _ in range(2):
        await asyncio.sleep(0.1)
        for pfn in bits(await src.dirty_log_fetch()):
            dst_mem[pfn * PAGE_SIZE : (pfn + 1) * PAGE_SIZE] = src_mem[pfn * PAGE_SIZE : (pfn + 1) * PAGE_SIZE]
    await src.pause()
    for pfn in bits(await src.dirty_log_fetch()):
        dst_mem[pfn * PAGE_SIZE : (pfn + 1) * PAGE_SIZE] = src_mem[pfn * PAGE_SIZE : (pfn + 1) * PAGE_SIZE]
    assert bytes(dst_mem) == bytes(src_mem), "the dirty log missed a page"
    at_stop = await src.stats()
    blob = await src.save_state()
    assert blob.startswith(state.MAGIC)
    await src.resume()
    with pytest.raises(DriverError, match="paused"):
        await src.save_state()  # a running domain's state cannot be saved
    await src.pause()

    await dst.load_state(blob)
    await dst.resume()
    await asyncio.sleep(0.3)
    after = await dst.stats()
    assert after["crashed"] is None, after["crashed"]
    assert after["ticks"] > at_stop["ticks"]
    assert after["pages_written"] > at_stop["pages_written"]
    assert after["vmm_pages"] > at_stop["vmm_pages"]  # the VMM's counters travelled in the blob
    ndata = layout.read_ctl(dst_mem)["ndata"]
    advanced = (after["sweep_pos"] - at_stop["sweep_pos"]) % ndata
    assert 0 < advanced < ndata // 2, "the sweep did not continue from where it stopped"
    assert await dst.check_invariant() is None


async def test_bad_state_and_stateless_resume_are_refused(kvm_drivers: Factory) -> None:
    dst = await kvm_drivers("a").create(config("e"), start=False)
    with pytest.raises(DriverError, match="no vCPU state"):
        await dst.resume()
    with pytest.raises(DriverError, match="not saved by the kvm driver"):
        await dst.load_state(b"a sim driver's state, say" * 4)
    with pytest.raises(DriverError, match="CRC"):
        blob = bytearray(state.pack({"vcpus": 1}, []))
        blob[-2] ^= 1
        await dst.load_state(bytes(blob))
    assert dst.state is DomainState.PAUSED


async def test_new_driver_finds_running_vm_after_daemon_restart(kvm_drivers: Factory) -> None:
    first = kvm_drivers("a")
    dom = await first.create(config("r"))
    pid = dom.pid  # type: ignore[attr-defined]
    await first.close()  # the daemon goes away; the VMM must not
    assert domproc.process_alive(pid, dom.config.uuid)

    second = kvm_drivers("a")
    await second.start()
    found = second.lookup("r")
    assert found is not None and found.config.uuid == dom.config.uuid
    assert found.state is DomainState.RUNNING
    before = await found.stats()
    await asyncio.sleep(0.3)
    assert (await found.stats())["pages_written"] > before["pages_written"]
    assert layout.read_ctl(found.memory())["magic"] == layout.CTL_MAGIC


async def test_destroy_leaves_no_process_and_no_files(kvm_drivers: Factory, tmp_path: Path) -> None:
    driver = kvm_drivers("a")
    doms = [await driver.create(config(f"x{i}")) for i in range(2)]
    pids = [d.pid for d in doms]  # type: ignore[attr-defined]
    for d in doms:
        await d.destroy()
        await d.destroy()  # idempotent
    for d, pid in zip(doms, pids):
        assert not domproc.process_alive(pid, d.config.uuid)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # not even a zombie
    assert driver.domains() == []
    assert list((tmp_path / "a" / "kvm").iterdir()) == []


async def test_capabilities(kvm_drivers: Factory) -> None:
    caps = await kvm_drivers("a").capabilities()
    assert caps.driver == "kvm"
    assert caps.max_vcpus >= 1
    assert caps.free_memory_bytes > 0
    assert {"fpu", "lm"} <= caps.cpu_features
    names = {p.name for p in Path("/sys/class/net").iterdir() if (p / "bridge").is_dir()}
    assert caps.bridges == names
