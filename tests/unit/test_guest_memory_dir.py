"""relocd-guest-memory-dir: guest memory as nameless files in a tmpfs (huge pages where mounted huge=)."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from relocd.drivers import hostinfo
from relocd.drivers.base import DomainConfig
from relocd.engine.policy import DowntimePolicy
from relocd.engine.source import SendOptions, SourceMigration, new_migration_id
from relocd.engine.stream import RecordChannel, memory_pipe
from relocd.engine.target import TargetSession
from relocd.protocol.records import Role
from relocd.protocol.state import Conversation
from tests.unit.simhosts import sim_pair

MOUNTINFO = """\
22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
40 22 0:35 / /dev/shm rw,nosuid,nodev shared:2 - tmpfs tmpfs rw
41 22 0:36 / /var/lib/relocd/guest\\040memory rw,relatime shared:3 - tmpfs relocd-guest rw,size=8388608k,huge=always
"""


def test_the_mount_holding_a_path_and_its_huge_option(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO)
    assert hostinfo.mount_of(Path("/var/lib/relocd/guest memory"), info) == (
        "/var/lib/relocd/guest memory", "tmpfs", "rw,size=8388608k,huge=always")
    assert hostinfo.mount_of(Path("/dev/shm/x"), info) == ("/dev/shm", "tmpfs", "rw")
    assert hostinfo.mount_of(Path("/srv"), info) == ("/", "ext4", "rw")


def test_a_directory_that_takes_no_nameless_files_is_refused_in_the_systems_words(tmp_path: Path) -> None:
    with pytest.raises(OSError) as info:
        hostinfo.guest_memory_dir(tmp_path / "missing")
    assert info.value.strerror
    assert "4 KiB pages" in hostinfo.guest_memory_dir(tmp_path)  # not a huge tmpfs: said so


def huge_page_bytes() -> int:
    """2 MiB pages of shared memory in use on this host (tmpfs's are counted as FileHugePages here)."""
    total = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("ShmemHugePages", "FileHugePages"):
            total += int(value.split()[0]) * 1024
    return total


async def _move(tmp_path: Path, memory_dir: Path, *, huge: bool = False) -> None:
    before = huge_page_bytes()
    async with sim_pair(tmp_path, memory_dir=memory_dir) as (a, b):
        dom = await a.driver.create(DomainConfig(name="vm", memory_mib=64, workload="hotset:size=8MiB,rate=20MB/s"))
        await asyncio.sleep(0.2)
        s, t = memory_pipe()
        mig = SourceMigration(
            dom, RecordChannel(s, Conversation(Role.SOURCE), max_frame=16 << 20),
            SendOptions(live=True, verify=True, policy=DowntimePolicy(50)),
            journal=a.journal, migration_id=new_migration_id(), target="b",
        )  # fmt: skip
        session = TargetSession(RecordChannel(t, Conversation(Role.TARGET), max_frame=16 << 20), b.ctx, peer="a")
        result, _ = await asyncio.gather(mig.run(), session.run())
        assert result.status == "completed", result.error
        assert result.verified is True
        moved = b.driver.lookup("vm")
        assert moved is not None
        # the target's guest memory is a file in the directory: the tmpfs holds its pages
        st = os.statvfs(memory_dir)
        assert (st.f_blocks - st.f_bfree) * st.f_frsize >= 64 << 20
        if huge:  # and in 2 MiB pages (both domains' memory is in the mount by now)
            assert huge_page_bytes() - before >= 32 << 20, "guest memory did not get huge pages"
        await moved.pause()
        assert await moved.check_invariant() is None


@pytest.fixture
def huge_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs mounted huge=always for this test (root only), unmounted after."""
    point = tmp_path / "huge"
    point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "huge=always,size=512m,mode=0700", "relocd-test-huge", str(point)],
                          capture_output=True, text=True)  # fmt: skip
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)


async def test_a_migration_into_a_huge_page_tmpfs(tmp_path: Path, huge_tmpfs: Path) -> None:
    assert hostinfo.guest_memory_dir(huge_tmpfs).startswith("2 MiB pages")
    await _move(tmp_path, huge_tmpfs, huge=True)
