"""Real daemons save, checkpoint and restore domains under a workload; bad files do nothing."""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import DaemonProc

HOTSET = "hotset:size=16MiB,rate=50MB/s"

@pytest.fixture
def two_hosts(tmp_path: Path, daemons: list[DaemonProc]) -> tuple[DaemonProc, DaemonProc]:
    a = DaemonProc(tmp_path, "hostA", "127.0.0.1")
    b = DaemonProc(tmp_path, "hostB", "127.0.0.2")
    daemons.extend([a, b])
    a.start()
    b.start()
    return a, b


async def names(d: DaemonProc) -> list[tuple[str, str]]:
    return [(x["name"], x["state"]) for x in await d.call("list")]


async def expect_error(d: DaemonProc, op: str, match: str, **args: Any) -> str:
    with pytest.raises(Exception) as info:
        await d.call(op, **args)
    msg = str(info.value)
    assert match in msg, msg
    assert "\n" not in msg.strip()
    return msg


async def running_domain(d: DaemonProc, name: str = "web1", memory: int = 64) -> dict[str, Any]:
    await d.call("create", name=name, memory=memory, workload=HOTSET)
    await asyncio.sleep(0.4)
    stats = (await d.call("stats", name=name))["stats"]
    assert stats["pages_written"] > 0, "the workload is not running"
    return stats


async def test_save_then_restore_twice(host: DaemonProc, tmp_path: Path) -> None:
    before = await running_domain(host)
    file = tmp_path / "web1.save"
    result = await host.call("save", name="web1", file=str(file), checkpoint=False)
    assert result["status"] == "completed", result
    assert await names(host) == [], "a saved domain no longer runs"
    assert file.exists() and [p.name for p in tmp_path.glob(".*partial")] == []
    info = await host.call("inspect", file=str(file))
    assert info["digest_ok"] and info["name"] == "web1" and info["memory_mib"] == 64

    restored = await host.call("restore", file=str(file), verify=True)
    assert restored["domain"] == "web1" and restored["verified_memory"]
    assert await names(host) == [("web1", "running")]
    check = await host.call("check", name="web1")
    assert check["ok"], check["problem"]
    assert check["stats"]["pages_written"] >= before["pages_written"], "it went on where it stopped"

    await expect_error(host, "restore", "already exists", file=str(file))
    await host.call("destroy", name="web1")
    await host.call("restore", file=str(file))
    check = await host.call("check", name="web1")
    assert check["ok"], check["problem"]


async def test_checkpoint_keeps_running_and_restores(host: DaemonProc, tmp_path: Path) -> None:
    await running_domain(host)
    file = tmp_path / "cp.save"
    result = await host.call("save", name="web1", file=str(file), checkpoint=True)
    assert result["status"] == "completed", result
    assert result["checkpoint"] and result["iterations"] >= 2
    assert 0 < result["pause_ms"] < 1000, result
    assert await names(host) == [("web1", "running")]
    before = (await host.call("stats", name="web1"))["stats"]["pages_written"]
    await asyncio.sleep(0.3)
    assert (await host.call("stats", name="web1"))["stats"]["pages_written"] > before
    await host.call("destroy", name="web1")
    restored = await host.call("restore", file=str(file), verify=True)
    assert restored["verified_memory"]
    check = await host.call("check", name="web1")
    assert check["ok"], check["problem"]


async def test_bad_files_are_refused_and_leave_nothing(host: DaemonProc, tmp_path: Path) -> None:
    """Refused: by the header or trailer before anything is built; by the digest, checked
    while the records load into a paused domain, before that domain ever runs (docs/savefile.md)."""
    await running_domain(host, memory=32)
    good = tmp_path / "good.save"
    await host.call("save", name="web1", file=str(good), checkpoint=False)
    raw = good.read_bytes()
    size = len(raw)
    cases = {
        "truncated": (raw[: size * 2 // 3], "truncated"),
        "header": (_flip(raw, 34), "corrupted header"),
        "pages": (_flip(raw, size // 2), "digest mismatch"),
        "pages-descriptor": (_flip(raw, _second_pages_record(raw) + 20), "digest mismatch"),
        "trailer-digest": (_with_trailer_digest(raw, bytes(32)), "digest mismatch"),
        "trailer": (_flip(raw, size - 20), "corrupted trailer"),
        "foreign": (b"\x7fELF" + raw[4:], "not a relocd savefile"),
    }
    for label, (content, why) in cases.items():
        bad = tmp_path / f"{label}.save"
        bad.write_bytes(content)
        await expect_error(host, "restore", why, file=str(bad))
        assert await names(host) == [], f"{label}: something was left behind"
        assert list((host.state_dir / "saves").glob("*.json")) == [], f"{label}: a restore marker was left"
    # those the header let through were begun, and the history says how they ended
    failed = [h for h in await host.call("history", name="web1") if h["kind"] == "restore"]
    loaded = [label for label, (_, why) in cases.items() if why == "digest mismatch"]
    assert sorted(Path(str(h["peer"])).stem for h in failed) == sorted(loaded), failed
    assert all(h["status"] == "failed" and "digest mismatch" in str(h["error"]) for h in failed), failed
    await host.call("restore", file=str(good))
    assert await names(host) == [("web1", "running")]
    check = await host.call("check", name="web1")
    assert check["ok"], check["problem"]


def _second_pages_record(raw: bytes) -> int:
    """File offset of the second PAGES record (a stop-and-copy save of more than 1024 pages)."""
    from relocd.protocol.codec import HEADER_SIZE
    from relocd.protocol.records import RecordType

    header_len = struct.unpack_from("!I", raw, 12)[0]
    at, seen = header_len, 0
    while True:
        rtype, _flags, _res, length, _crc = struct.unpack_from("!BBHII", raw, at)
        if rtype == RecordType.PAGES:
            seen += 1
            if seen == 2:
                return at
        at += HEADER_SIZE + length  # a PAGES length counts its payload


def _with_trailer_digest(raw: bytes, digest: bytes) -> bytes:
    """The file with a trailer that claims ``digest`` (its CRC made valid)."""
    from relocd.engine.savefile_format import TRAILER_SIZE, Trailer

    return raw[:-TRAILER_SIZE] + Trailer(stream_end=len(raw) - TRAILER_SIZE, digest=digest).pack()


def _flip(raw: bytes, at: int) -> bytes:
    out = bytearray(raw)
    out[at] ^= 0x01
    return bytes(out)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
async def test_save_onto_a_full_filesystem_fails_cleanly(host: DaemonProc, tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        await running_domain(host, memory=64)
        await expect_error(host, "save", "No space left on device", name="web1", file=str(small / "web1.save"))
        assert list(small.iterdir()) == [], "no partial file may stay"
        assert await names(host) == [("web1", "running")]
        before = (await host.call("stats", name="web1"))["stats"]["pages_written"]
        await asyncio.sleep(0.3)
        assert (await host.call("stats", name="web1"))["stats"]["pages_written"] > before, "resumed"
        assert (await host.call("check", name="web1"))["ok"]
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


async def test_cold_migration_between_two_daemons(two_hosts: tuple[DaemonProc, DaemonProc], tmp_path: Path) -> None:
    a, b = two_hosts
    await running_domain(a, "db1")
    on_a = tmp_path / "a-disk" / "db1.save"
    on_a.parent.mkdir()
    result = await a.call("save", name="db1", file=str(on_a))
    assert result["status"] == "completed", result
    on_b = tmp_path / "b-disk" / "db1.save"
    on_b.parent.mkdir()
    shutil.copyfile(on_a, on_b)  # "scp"
    await b.call("restore", file=str(on_b), verify=True)
    assert await names(a) == []
    assert await names(b) == [("db1", "running")]
    check = await b.call("check", name="db1")
    assert check["ok"], check["problem"]


@pytest.fixture(autouse=True)
def _no_stray_partials(tmp_path: Path) -> Iterator[None]:
    yield
    assert not list(tmp_path.rglob(".*.partial")), "a .partial file was left behind"
