"""Disks checked at RESERVE: the target refuses, naming each disk it cannot open, before any page moves."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from relocd.drivers.base import DomainConfig, DomainState, HostCaps
from relocd.drivers.sim import SimDriver
from relocd.engine.policy import DowntimePolicy
from relocd.engine.reservation import (
    ReservationRequest,
    check_reservation,
    find_unreachable_disks,
)
from relocd.engine.source import SendOptions, SourceMigration, new_migration_id
from relocd.engine.stream import RecordChannel, memory_pipe
from relocd.engine.target import TargetSession
from relocd.errors import ProtocolError, Reason, ReservationRefused
from relocd.protocol.records import Role
from relocd.protocol.state import Conversation
from tests.unit.simhosts import SimHost as Host
from tests.unit.simhosts import TappedChannel, sim_pair

UUID = "6f9619ff-8b86-d011-b42d-00cf4fc964ff"
CAPS = HostCaps(driver="sim", free_memory_bytes=8 << 30, max_vcpus=16)


def request(**overrides: Any) -> ReservationRequest:
    wire: dict[str, Any] = {"name": "web1", "uuid": UUID, "memory_bytes": 1 << 30, "vcpus": 1, "driver": "sim"}
    wire.update(overrides)
    return ReservationRequest.from_wire(wire)


def test_disks_travel_and_an_older_source_says_none() -> None:
    assert request().disks is None  # absent key: an older source, nothing to check
    assert request(disks=[]).disks == ()
    assert request(disks=["/dev/vg0/web1", "/srv/img/web1 data.qcow2"]).disks == (
        "/dev/vg0/web1", "/srv/img/web1 data.qcow2",
    )  # fmt: skip
    config = DomainConfig(name="web1", memory_mib=64, disks=("/dev/vg0/web1",))
    assert ReservationRequest.for_domain(config, live=True).to_wire()["disks"] == ["/dev/vg0/web1"]


@pytest.mark.parametrize(
    "disks",
    [["relative.img"], ["/srv/../etc/shadow"], ["/srv/a\nb"], ["/dev/x"] * 65, [7], "/dev/x", ["/" + "a" * 5000]],
)
def test_malformed_disks_are_a_protocol_error(disks: object) -> None:
    with pytest.raises(ProtocolError) as bad:
        request(disks=disks)
    assert bad.value.message.startswith("bad reservation request: disks") and "\n" not in bad.value.message


def test_unreachable_disks_are_refused_by_name() -> None:
    req = request(disks=["/dev/vg0/web1", "/srv/web1.img"])
    missing = ["/dev/vg0/web1 (No such file or directory)", "/srv/web1.img (Permission denied)"]
    with pytest.raises(ReservationRefused) as refused:
        check_reservation(
            req, CAPS, max_memory=None, reserved_bytes=0, existing_names=set(), existing_uuids=set(),
            unreachable_disks=missing,
        )  # fmt: skip
    assert refused.value.reason == Reason.NETWORK
    assert refused.value.message == (
        "domain web1 needs disks this host cannot open: "
        "/dev/vg0/web1 (No such file or directory), /srv/web1.img (Permission denied)"
    )
    check_reservation(req, CAPS, max_memory=None, reserved_bytes=0, existing_names=set(), existing_uuids=set())


async def test_driver_opens_each_disk(tmp_path: Path) -> None:
    """The seam's check: files and block devices open; missing paths, directories, FIFOs and ttys do not."""
    image = tmp_path / "web1.img"
    image.write_bytes(bytes(4096))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening one for reading would wait for a writer: the check must not
    locked = tmp_path / "locked.img"
    locked.write_bytes(b"")
    locked.chmod(0)
    driver = SimDriver(tmp_path / "sim")
    disks = [str(image), str(tmp_path / "gone.img"), str(tmp_path), str(fifo), "/dev/null"]
    found = await asyncio.wait_for(driver.unreachable_disks(disks), 10)
    assert found == [
        f"{tmp_path / 'gone.img'} (No such file or directory)",
        f"{tmp_path} (not a block device or file)",
        f"{fifo} (not a block device or file)",
        "/dev/null (not a block device or file)",
    ]
    assert await driver.unreachable_disks([]) == []
    if os.geteuid() != 0:  # root opens a mode-0 file anyway
        assert await driver.unreachable_disks([str(locked)]) == [f"{locked} (Permission denied)"]


class NoDiskChecks(SimDriver):
    async def unreachable_disks(self, disks: Sequence[str]) -> list[str]:
        raise AssertionError("an older source's request (no disks key) must not be checked")


async def test_no_disks_key_means_no_check(tmp_path: Path) -> None:
    assert await find_unreachable_disks(request(), NoDiskChecks(tmp_path)) == []
    assert await find_unreachable_disks(request(disks=[]), NoDiskChecks(tmp_path)) == []
    found = await find_unreachable_disks(request(disks=["/nonexistent/relocd/disk"]), SimDriver(tmp_path))
    assert found == ["/nonexistent/relocd/disk (No such file or directory)"]


@pytest.fixture
async def hosts(tmp_path: Path) -> AsyncIterator[tuple[Host, Host]]:
    async with sim_pair(tmp_path) as pair:
        yield pair


async def migrate(a: Host, b: Host, name: str) -> tuple[Any, list[object]]:
    src_t, dst_t = memory_pipe()
    received: list[object] = []
    src = RecordChannel(src_t, Conversation(Role.SOURCE), max_frame=16 << 20)
    dst = TappedChannel(dst_t, Conversation(Role.TARGET), max_frame=16 << 20, received=received)
    dom = a.driver.lookup(name)
    assert dom is not None
    mig = SourceMigration(
        dom, src, SendOptions(live=True, verify=False, policy=DowntimePolicy(50)),
        journal=a.journal, migration_id=new_migration_id(), target="b",
    )  # fmt: skip
    session = TargetSession(dst, b.ctx, peer="a")
    result, _ = await asyncio.gather(mig.run(), session.run(), return_exceptions=True)
    return result, received


async def test_move_refused_for_a_disk_the_target_cannot_reach(hosts: tuple[Host, Host], tmp_path: Path) -> None:
    a, b = hosts
    here = tmp_path / "web1-root.img"
    here.write_bytes(bytes(4096))
    gone = tmp_path / "web1-data.img"  # on the source's storage only
    await a.driver.create(DomainConfig(name="web1", memory_mib=16, disks=(str(here), str(gone))))
    result, received = await migrate(a, b, "web1")
    assert result.status == "failed", result
    assert result.error == (
        f"target refused: domain web1 needs disks this host cannot open: {gone} (No such file or directory)"
    )
    assert [type(r).__name__ for r in received] == ["Hello", "Reserve"], "more than RESERVE crossed before the refusal"
    dom = a.driver.lookup("web1")
    assert dom is not None and dom.state == DomainState.RUNNING
    assert b.driver.domains() == [] and len(b.ctx.reservations) == 0


async def test_move_with_every_disk_reachable_goes_ahead(hosts: tuple[Host, Host], tmp_path: Path) -> None:
    a, b = hosts
    disk = tmp_path / "shared.img"
    disk.write_bytes(bytes(4096))
    await a.driver.create(DomainConfig(name="web1", memory_mib=16, disks=(str(disk),)))
    result, _ = await migrate(a, b, "web1")
    assert result.status == "completed", result.error
    assert a.driver.lookup("web1") is None and b.driver.lookup("web1") is not None
