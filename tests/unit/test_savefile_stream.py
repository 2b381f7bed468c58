"""Savefiles of stream domains (Xen PV's kind: the driver's own stream), and `relocd restore` of an
xl save image, against fake stream drivers that behave as the xen driver does (no Xen needed)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest

from relocd.drivers.base import DomainConfig, DomainState, Driver
from relocd.drivers.xen import xlimage
from relocd.engine.policy import XendPolicy
from relocd.engine.reservation import ReservationTable
from relocd.engine.savefile import inspect_savefile, restore_savefile, save_domain
from relocd.engine.savefile_io import OpenSavefile
from relocd.engine.savefile_stream import open_foreign
from relocd.engine.target import TargetContext
from relocd.errors import ProtocolError, RelocdError, SaveFileError
from relocd.protocol.records import (
    Commit,
    Config,
    Digest,
    DigestAlgo,
    PagesHeader,
    Role,
    Stop,
    StreamChunk,
    VcpuState,
)
from relocd.protocol.state import Conversation, ConversationState
from tests.unit.fakestream import StreamDomain, StreamDriver

UUID = "0b5e8a4c-4f6e-4c1a-9d1e-5a6b7c8d9e0f"


def context(*drivers: Driver) -> TargetContext:
    return TargetContext(
        drivers={d.name: d for d in drivers}, reservations=ReservationTable(30), journal=None  # type: ignore[arg-type]
    )


async def running(driver: StreamDriver, name: str = "pv", mib: int = 2) -> StreamDomain:
    dom = await driver.create(DomainConfig(name=name, memory_mib=mib, driver=driver.name))
    assert isinstance(dom, StreamDomain)
    return dom


def listing(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.iterdir())


async def records_of(path: Path) -> list[Any]:
    with OpenSavefile.open(str(path)) as opened:
        channel = opened.channel()
        out: list[Any] = []
        while not out or not isinstance(out[-1], Commit):
            out.append(await channel.recv())
        return out


# -- save and restore --------------------------------------------------------------


async def test_stream_domain_saves_and_restores(tmp_path: Path) -> None:
    src = StreamDriver()
    dom = await running(src)
    image = dom.image
    path = tmp_path / "pv.save"
    result = await save_domain(dom, path, checkpoint=False, policy=XendPolicy())
    assert result.status == "completed" and result.stream_bytes == len(image) and result.iterations == 1
    assert dom.destroyed and src.domains() == [], "xm save: the saved domain is gone"
    assert listing(tmp_path) == ["pv.save"] and oct(path.stat().st_mode & 0o777) == "0o600"

    records = await records_of(path)
    assert isinstance(records[0], Config) and "whole" in records[0].text, "CONFIG carries the whole config"
    assert records[1] == Stop(1)
    chunks = records[2:-2]
    assert chunks and all(isinstance(r, StreamChunk) for r in chunks)
    assert b"".join(r.data for r in chunks) == image
    assert records[-2:] == [VcpuState("fakestream", b""), Commit()]

    info = await inspect_savefile(str(path))
    assert info["digest_ok"] and info["transfer"] == "stream" and info["name"] == "pv" and info["memory_mib"] == 2

    dst = StreamDriver()
    ctx = context(dst)
    restored = await restore_savefile(str(path), ctx)
    assert restored.domain == "pv" and restored.details["stream_bytes"] == len(image)
    [new] = dst.doms
    assert new.name == "pv" and new.state == DomainState.RUNNING and new.image == image
    assert new.config.extra.get("whole") == "yes"
    assert ctx.reservations.all() == [] and ctx.incoming == {}
    # the file stays, and a second restore is refused while the first copy runs
    with pytest.raises(RelocdError, match="a domain named pv already exists"):
        await restore_savefile(str(path), ctx)
    assert dst.builds == 1
    await new.destroy()
    await restore_savefile(str(path), ctx)
    assert dst.doms[0].image == image


async def test_checkpoint_of_a_stream_domain_runs_on_and_restores(tmp_path: Path) -> None:
    """save --checkpoint (xl save -c): the driver's live stream, its suspend cancelled; the file restores elsewhere."""
    driver = StreamDriver()
    dom = await running(driver)
    path = tmp_path / "cp.save"
    result = await save_domain(dom, path, checkpoint=True, policy=XendPolicy(max_iterations=3, dirty_threshold=0))
    assert result.status == "completed" and result.checkpoint
    assert result.iterations == 4  # three precopy rounds (the policy's), then the suspended copy
    assert result.pause_ms > 0 and result.stream_bytes > len(dom.image)  # precopy rounds, then the last copy
    assert dom in driver.doms and dom.state == DomainState.RUNNING and not dom.suspended and dom.cancels == 1
    assert listing(tmp_path) == ["cp.save"]
    info = await inspect_savefile(str(path))
    assert info["checkpoint"] is True and info["digest_ok"] is True, info
    dst = StreamDriver()
    restored = await restore_savefile(str(path), context(dst))
    [new] = dst.doms
    assert restored.domain == "pv" and new.state == DomainState.RUNNING and new.image == dom.image


@pytest.mark.parametrize("driver_resumes", [True, False], ids=["driver-resumes", "engine-resumes"])
async def test_full_disk_during_the_stream_leaves_the_domain_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, driver_resumes: bool
) -> None:
    driver = StreamDriver()
    driver.resumes_on_failure = driver_resumes
    dom = await running(driver)
    real = os.writev
    calls = {"n": 0}

    def failing(fd: int, bufs: Any) -> int:
        calls["n"] += 1
        if calls["n"] > 6:  # header, CONFIG, STOP, a few chunks: the domain is suspended by now
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, bufs)

    monkeypatch.setattr(os, "writev", failing)
    with pytest.raises(SaveFileError, match="No space left on device") as info:
        await save_domain(dom, tmp_path / "x.save", checkpoint=False, policy=XendPolicy())
    assert "receiver failed" not in info.value.message, "the cause, not the driver's echo of it"
    assert listing(tmp_path) == []
    assert dom.state == DomainState.RUNNING and not dom.suspended and not dom.destroyed
    assert dom.cancels >= 1 and driver.domains() == [dom]


async def test_failure_after_the_stream_resumes_the_suspended_domain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fsync fails once the whole stream is written: the driver's send_stream returned, the domain is suspended."""
    driver = StreamDriver()
    dom = await running(driver)

    def failing_fsync(fd: int) -> None:
        assert dom.suspended
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(SaveFileError, match="Input/output error"):
        await save_domain(dom, tmp_path / "x.save", checkpoint=False, policy=XendPolicy())
    assert listing(tmp_path) == []
    assert dom.state == DomainState.RUNNING and not dom.suspended and dom.cancels == 1 and not dom.destroyed


async def test_corrupted_stream_savefile_is_refused_before_anything_is_built(tmp_path: Path) -> None:
    dom = await running(StreamDriver())
    good = tmp_path / "good.save"
    await save_domain(dom, good, checkpoint=False, policy=XendPolicy())
    raw = good.read_bytes()
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0x01
    bad = tmp_path / "bad.save"
    driver = StreamDriver()
    for content, why in ((bytes(flipped), "digest mismatch"), (raw[:-100], "truncated")):
        bad.write_bytes(content)
        with pytest.raises(SaveFileError, match=why):
            await restore_savefile(str(bad), context(driver))
    bad.write_bytes(bytes(flipped))
    info = await inspect_savefile(str(bad))
    assert not info["digest_ok"] and "digest mismatch" in info["problem"]
    assert driver.builds == 0 and driver.doms == []


async def test_name_clash_is_refused_before_anything_is_built(tmp_path: Path) -> None:
    dom = await running(StreamDriver())
    path = tmp_path / "pv.save"
    await save_domain(dom, path, checkpoint=False, policy=XendPolicy())
    driver = StreamDriver()
    other = await running(driver)  # another domain called pv
    with pytest.raises(RelocdError, match="a domain named pv already exists"):
        await restore_savefile(str(path), context(driver))
    assert driver.builds == 0 and driver.doms == [other]


async def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    dom = await running(StreamDriver())
    path = tmp_path / "pv.save"
    await save_domain(dom, path, checkpoint=False, policy=XendPolicy())
    driver = StreamDriver()
    driver.fail_build = True
    ctx = context(driver)
    with pytest.raises(RelocdError, match="restore failed"):
        await restore_savefile(str(path), ctx)
    assert driver.doms == [] and ctx.reservations.all() == [] and ctx.incoming == {}


def test_savefile_conversation_has_a_stream_form() -> None:
    conv = Conversation(Role.SOURCE, savefile=True)
    for record in (Config("(domain)"), Stop(1), StreamChunk(b"x"), StreamChunk(b"y"), VcpuState("xen", b"")):
        conv.send(record)
    with pytest.raises(ProtocolError, match="DIGEST"):
        conv.send(Digest(DigestAlgo.BLAKE3, bytes(32)))  # the stream carries its own checks
    conv.send(Commit())
    assert conv.state is ConversationState.SAVED
    conv = Conversation(Role.SOURCE, savefile=True)
    for record in (Config("(domain)"), Stop(1), StreamChunk(b"x")):
        conv.send(record)
    with pytest.raises(ProtocolError, match="PAGES"):
        conv.send(PagesHeader)


# -- xl save images --------------------------------------------------------------


def libxl_config(name: str = "web1", memkb: int = 8192) -> dict[str, Any]:
    return {
        "c_info": {"type": "pv", "name": name, "uuid": UUID},
        "b_info": {"max_vcpus": 1, "max_memkb": memkb, "target_memkb": memkb,
                   "type.pv": {"kernel": "/var/lib/xen/vmlinuz"}},
        "nics": [{"mac": "00:16:3e:00:00:01", "bridge": "xenbr0"}],
    }  # fmt: skip


def xl_image(path: Path, stream: bytes, config: dict[str, Any] | None = None) -> Path:
    """What `xl save` writes: xl's header and JSON config, libxl's stream around libxenguest's, END."""
    path.write_bytes(xlimage.image_prefix(config or libxl_config()) + stream + xlimage.image_suffix())
    return path


STREAM = b"libxenguest stream " * 40000  # ~760 KiB: a few chunks


async def test_xl_image_is_recognised_and_described(tmp_path: Path) -> None:
    path = xl_image(tmp_path / "web1.xl", STREAM)
    foreign = open_foreign(str(path))
    assert foreign is not None
    with foreign:
        image = foreign.image
        assert (image.driver, image.kind, image.host) == ("xen", "an xl save image", "a Xen host")
        assert image.config.name == "web1" and image.config.uuid == UUID and image.config.memory_mib == 8
        assert path.read_bytes()[image.stream_start : image.stream_end] == STREAM
    info = await inspect_savefile(str(path))
    assert info["format"] == "an xl save image" and info["driver"] == "xen" and info["name"] == "web1"
    assert info["stream_bytes"] == len(STREAM) and info["digest_ok"] is None


async def test_xl_image_on_a_daemon_without_xen_is_a_clear_error(tmp_path: Path) -> None:
    path = xl_image(tmp_path / "web1.xl", STREAM)
    sim = StreamDriver("sim")
    with pytest.raises(SaveFileError) as info:
        await restore_savefile(str(path), context(sim))
    msg = info.value.message
    assert msg == f"{path}: an xl save image (domain web1): restore it on a Xen host; this daemon has no xen driver"
    assert sim.builds == 0


async def test_xl_image_is_restored_by_the_xen_driver(tmp_path: Path) -> None:
    path = xl_image(tmp_path / "web1.xl", STREAM)
    xen = StreamDriver("xen")
    ctx = context(xen)
    result = await restore_savefile(str(path), ctx)
    assert result.domain == "web1" and result.details["format"] == "an xl save image"
    assert xen.received == STREAM, "exactly the stream between the image's prefix and its END record"
    [dom] = xen.doms
    assert dom.name == "web1" and dom.state == DomainState.RUNNING
    assert json.loads(dom.config.extra["libxl_json"])["c_info"]["name"] == "web1"
    assert ctx.reservations.all() == [] and ctx.incoming == {}
    with pytest.raises(RelocdError, match="a domain named web1 already exists"):
        await restore_savefile(str(path), ctx)
    assert xen.builds == 1


async def test_xl_image_too_big_for_the_host_is_refused_first(tmp_path: Path) -> None:
    path = xl_image(tmp_path / "big.xl", STREAM, libxl_config(memkb=64 << 30 >> 10))
    xen = StreamDriver("xen")
    with pytest.raises(RelocdError, match="not enough memory"):
        await restore_savefile(str(path), context(xen))
    assert xen.builds == 0


async def test_bad_xl_images_are_refused_clearly(tmp_path: Path) -> None:
    good = xl_image(tmp_path / "good.xl", STREAM).read_bytes()
    no_json = xlimage.image_prefix(None) + STREAM + xlimage.image_suffix()
    cases = {
        "cut": (good[: len(good) // 2], "truncated"),
        "header-only": (good[:40], "truncated"),
        "no-json": (no_json, "no JSON domain config"),
        "bad-config": (xlimage.image_prefix({"c_info": {}}) + STREAM + xlimage.image_suffix(), "not usable"),
    }
    xen = StreamDriver("xen")
    for name, (content, why) in cases.items():
        bad = tmp_path / f"{name}.xl"
        bad.write_bytes(content)
        with pytest.raises(SaveFileError, match=why) as info:
            await restore_savefile(str(bad), context(xen))
        assert info.value.message.startswith(f"{bad}: an xl save image, but "), info.value.message
        assert "\n" not in info.value.message
    assert xen.builds == 0


async def test_other_files_are_still_not_relocd_savefiles(tmp_path: Path) -> None:
    path = tmp_path / "junk"
    path.write_bytes(b"#!/bin/sh\n" + bytes(200))
    with pytest.raises(SaveFileError, match="not a relocd savefile"):
        await restore_savefile(str(path), context(StreamDriver("xen")))
