"""Real KVM virtual machines moved between two daemons (issue 4's proof)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "daemon"))

from harness import DaemonProc  # noqa: E402

from relocd.drivers.kvm.driver import kvm_usable  # noqa: E402

HOTSET = "hotset:size=16MiB,rate=20MB/s"


@pytest.fixture
def pair(tmp_path: Path, needs_kvm: None) -> Iterator[tuple[DaemonProc, DaemonProc]]:
    """Two daemons, once the kernel (not relocd) has said /dev/kvm works: relocd must agree."""
    problem = kvm_usable()
    assert problem is None, f"/dev/kvm works, but relocd's kvm_usable() says: {problem}"
    a = DaemonProc(tmp_path, "hostA", "127.0.0.1")
    b = DaemonProc(tmp_path, "hostB", "127.0.0.2")
    try:
        a.start()
        b.start()
        yield a, b
    finally:
        a.cleanup()
        b.cleanup()


async def listing(d: DaemonProc) -> list[tuple[str, str, str]]:
    return [(x["name"], x["state"], x["driver"]) for x in await d.call("list")]


async def wait_for_progress(d: DaemonProc, name: str, above: int) -> dict[str, object]:
    for _ in range(100):
        stats = (await d.call("stats", name=name))["stats"]
        if int(stats["pages_written"]) > above:
            return stats
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} makes no progress: {stats}")


@pytest.mark.parametrize("live", [True, False], ids=["live", "non-live"])
async def test_kvm_domain_migrates_and_carries_on(pair: tuple[DaemonProc, DaemonProc], live: bool) -> None:
    a, b = pair
    await a.call("create", name="vm1", memory=256, driver="kvm", workload=HOTSET)
    before = await wait_for_progress(a, "vm1", 1000)
    result = await a.call("migrate", name="vm1", host=b.address, port=b.port, live=live, verify=True)
    assert result["status"] == "completed", result
    assert result["verified"] is True, "memory digests differ at the stop point"
    assert await listing(a) == []
    assert await listing(b) == [("vm1", "running", "kvm")]
    # the guest goes on from where it stopped, not from zero
    after = await wait_for_progress(b, "vm1", int(before["pages_written"]))
    assert int(after["ticks"]) >= int(before["ticks"])
    check = await b.call("check", name="vm1")
    assert check["ok"], check["problem"]


async def test_kvm_save_restore(pair: tuple[DaemonProc, DaemonProc], tmp_path: Path) -> None:
    a, _ = pair
    await a.call("create", name="vm2", memory=64, driver="kvm", workload=HOTSET)
    before = await wait_for_progress(a, "vm2", 500)
    saved = await a.call("save", name="vm2", file=str(tmp_path / "vm2.save"))
    assert saved["status"] == "completed", saved
    assert await listing(a) == []
    await a.call("restore", file=str(tmp_path / "vm2.save"))
    assert await listing(a) == [("vm2", "running", "kvm")]
    await wait_for_progress(a, "vm2", int(before["pages_written"]))
    assert (await a.call("check", name="vm2"))["ok"]


async def test_killing_the_daemon_leaves_the_vm_running(pair: tuple[DaemonProc, DaemonProc]) -> None:
    a, _ = pair
    await a.call("create", name="vm3", memory=64, driver="kvm", workload=HOTSET)
    before = await wait_for_progress(a, "vm3", 500)
    a.kill()
    await asyncio.sleep(0.5)
    a.start()
    assert await listing(a) == [("vm3", "running", "kvm")]
    await wait_for_progress(a, "vm3", int(before["pages_written"]))
