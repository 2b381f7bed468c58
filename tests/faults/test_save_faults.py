"""A daemon killed in the middle of a save or a restore: nothing looks done that is not.

After the restart: no partial file is left (and none looks complete), no
save/restore marker and no half-restored domain is left, a savefile under its
final name verifies, and the domain runs exactly once, its memory intact.
Each test then saves and restores once more, to show nothing stale is in the
way.  (The disk-full save is tests/daemon/test_save_restore.py.)

The kill comes from outside (SIGKILL), at a moment a thread polling the file
system picks: the partial file appearing or growing, the restore's marker, the
half-restored domain's record in the sim driver's state directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cells import FaultyDaemon

from relocd.drivers.base import INCOMING_SUFFIX

MEMORY_MIB = 128
WORKLOAD = "hotset:size=8MiB,rate=40MB/s"


@pytest.fixture
def host(tmp_path: Path) -> Iterator[FaultyDaemon]:
    d = FaultyDaemon(tmp_path, "hostA", "127.0.0.1")
    try:
        d.start()
        yield d
    finally:
        d.cleanup()


def partials(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.partial"))


async def kill_when(d: FaultyDaemon, moment: Callable[[], bool], timeout: float = 30.0) -> bool:
    """SIGKILL d as soon as moment() holds (polled every half millisecond in a thread)."""

    def poll() -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with contextlib.suppress(OSError):
                if moment():
                    d.kill()
                    return True
            time.sleep(0.0005)
        return False

    return await asyncio.to_thread(poll)


async def run_killed(d: FaultyDaemon, op: str, moment: Callable[[], bool], **args: Any) -> None:
    """Start op, kill the daemon at moment, restart it (its recovery runs at startup)."""
    call = asyncio.ensure_future(d.call(op, **args))
    killed = await kill_when(d, moment)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(call, 10)
    assert killed, f"{op} finished before the kill point was reached"
    assert not d.alive
    await asyncio.to_thread(d.start)


async def assert_runs_once(d: FaultyDaemon, uuid: str) -> None:
    listing = await d.call("list")
    assert not [x for x in listing if x["name"].endswith(INCOMING_SUFFIX)], listing
    mine = [x for x in listing if x["uuid"] == uuid]
    assert [(x["name"], x["state"]) for x in mine] == [("web", "running")], listing
    check = await d.call("check", name="web")
    assert check["ok"], check["problem"]
    assert list((d.state_dir / "saves").glob("*.json")) == [], "a save/restore marker was left"


async def round_trip(d: FaultyDaemon, file: Path, uuid: str) -> None:
    """A fresh save and restore succeed: nothing stale blocks either."""
    file.unlink(missing_ok=True)
    saved = await d.call("save", name="web", file=str(file), checkpoint=False)
    assert saved["status"] == "completed", saved
    restored = await d.call("restore", file=str(file), verify=True)
    assert restored["verified_memory"]
    await assert_runs_once(d, uuid)


def _size_at_least(folder: Path, nbytes: int) -> Callable[[], bool]:
    return lambda: any(p.stat().st_size >= nbytes for p in partials(folder))


SAVE_MOMENTS: dict[str, tuple[bool, Callable[[Path], Callable[[], bool]]]] = {
    # the temporary file was just created
    "save-start": (False, lambda folder: lambda: bool(partials(folder))),
    # most of memory is in the file: the digest, trailer, fsync or rename are next
    "save-late": (False, lambda folder: _size_at_least(folder, MEMORY_MIB * 3 << 18)),
    # a checkpoint (the domain keeps running) in its precopy rounds
    "checkpoint": (True, lambda folder: _size_at_least(folder, 8 << 20)),
}


@pytest.mark.parametrize("moment", list(SAVE_MOMENTS))
async def test_killed_mid_save(host: FaultyDaemon, tmp_path: Path, moment: str) -> None:
    checkpoint, make_moment = SAVE_MOMENTS[moment]
    created = await host.call("create", name="web", memory=MEMORY_MIB, workload=WORKLOAD)
    folder = tmp_path / "saves"
    folder.mkdir()
    file = folder / "web.save"
    await run_killed(host, "save", make_moment(folder), name="web", file=str(file), checkpoint=checkpoint)

    assert partials(folder) == [], "a partial savefile outlived the restart"
    if file.exists():  # killed after the final rename: then it must be whole
        info = await host.call("inspect", file=str(file))
        assert info["digest_ok"], info
    await assert_runs_once(host, created["uuid"])
    await round_trip(host, file, created["uuid"])


def _marker(d: FaultyDaemon) -> Callable[[], bool]:
    return lambda: any((d.state_dir / "saves").glob("restore-*.json"))


def _half_restored(d: FaultyDaemon) -> Callable[[], bool]:
    def seen() -> bool:
        return any(INCOMING_SUFFIX in p.read_text() for p in (d.state_dir / "sim").glob("*.json"))

    return seen


RESTORE_MOMENTS = {
    "restore-verify": _marker,  # checking the file's digest, nothing built yet
    "restore-load": _half_restored,  # the domain exists as NAME--incoming, pages going in
}


@pytest.mark.parametrize("moment", list(RESTORE_MOMENTS))
async def test_killed_mid_restore(host: FaultyDaemon, tmp_path: Path, moment: str) -> None:
    created = await host.call("create", name="web", memory=MEMORY_MIB, workload=WORKLOAD)
    file = tmp_path / "web.save"
    saved = await host.call("save", name="web", file=str(file), checkpoint=False)
    assert saved["status"] == "completed", saved

    await run_killed(host, "restore", RESTORE_MOMENTS[moment](host), file=str(file))

    listing = await host.call("list")
    assert listing == [], f"a half-restored domain outlived the restart: {listing}"
    assert list((host.state_dir / "saves").glob("*.json")) == []
    info = await host.call("inspect", file=str(file))
    assert info["digest_ok"], "a restore must leave its savefile intact"
    restored = await host.call("restore", file=str(file), verify=True)
    assert restored["verified_memory"]
    await assert_runs_once(host, created["uuid"])
    await round_trip(host, file, created["uuid"])
