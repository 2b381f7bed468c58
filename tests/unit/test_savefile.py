"""Savefile format and save/restore flows against an in-memory domain (no processes)."""

from __future__ import annotations

import errno
import os
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from relocd.drivers.base import Domain, DomainConfig, DomainState, Driver, HostCaps
from relocd.engine import savefile_format as fmt
from relocd.engine.pages import pfns_to_bitmap
from relocd.engine.policy import XendPolicy
from relocd.engine.reservation import ReservationTable
from relocd.engine.savefile import inspect_savefile, restore_savefile, save_domain
from relocd.engine.savefile_io import OpenSavefile
from relocd.engine.target import TargetContext
from relocd.errors import RelocdError, SaveFileError
from relocd.protocol.records import Commit, EndRound, PagesHeader, Stop
from relocd.units import PAGE_SIZE

DOC = Path(__file__).resolve().parents[2] / "docs" / "savefile.md"


class FakeDomain(Domain):
    """Memory is a bytearray; ``writes_per_fetch`` pages change at each dirty-log fetch while running."""

    def __init__(self, config: DomainConfig, *, writes_per_fetch: int = 0, seed: int = 1) -> None:
        self.config = config
        self.mem = bytearray(config.memory_bytes)
        self._state = DomainState.PAUSED
        self.dirty: set[int] = set()
        self.logging = False
        self.writes_per_fetch = writes_per_fetch
        self.rng = np.random.default_rng(seed)
        self.blob = b"vcpu-state-" + config.uuid.encode()
        self.loaded: bytes | None = None
        self.snapshot_at_pause: bytes | None = None
        self.destroyed = False
        self.pauses = 0
        self.resumes = 0

    @property
    def state(self) -> DomainState:
        return self._state

    def memory(self) -> memoryview:
        return memoryview(self.mem)

    def fill(self, zero_every: int = 5) -> None:
        pages = np.frombuffer(self.mem, dtype=np.uint8).reshape(-1, PAGE_SIZE)
        pages[:] = self.rng.integers(0, 256, size=pages.shape, dtype=np.uint8)
        pages[::zero_every] = 0

    def scribble(self, n: int) -> None:
        pages = np.frombuffer(self.mem, dtype=np.uint8).reshape(-1, PAGE_SIZE)
        for pfn in self.rng.integers(0, len(pages), size=n).tolist():
            pages[pfn, :16] = self.rng.integers(1, 256, size=16, dtype=np.uint8)
            if self.logging:
                self.dirty.add(pfn)

    async def pause(self) -> None:
        self._state = DomainState.PAUSED
        self.pauses += 1
        self.snapshot_at_pause = bytes(self.mem)

    async def resume(self) -> None:
        self._state = DomainState.RUNNING
        self.resumes += 1

    async def destroy(self) -> None:
        self.destroyed = True
        self._state = DomainState.PAUSED

    async def rename(self, new_name: str) -> None:
        self.config = self.config.model_copy(update={"name": new_name})

    async def dirty_log_start(self) -> None:
        self.logging, self.dirty = True, set()

    async def dirty_log_fetch(self) -> Any:
        if self._state == DomainState.RUNNING and self.writes_per_fetch:
            self.scribble(self.writes_per_fetch)
        out = pfns_to_bitmap(sorted(self.dirty), self.npages)
        self.dirty = set()
        return out

    async def dirty_log_stop(self) -> None:
        self.logging = False

    async def save_state(self) -> bytes:
        assert self._state == DomainState.PAUSED
        return self.blob

    async def load_state(self, blob: bytes) -> None:
        self.loaded = blob


class FakeDriver(Driver):
    name = "sim"

    def __init__(self, free: int = 1 << 34) -> None:
        super().__init__(Path("/nonexistent"))
        self.doms: list[FakeDomain] = []
        self.created = 0
        self.free = free

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def domains(self) -> list[Domain]:
        return [d for d in self.doms if not d.destroyed]

    async def create(self, config: DomainConfig, *, start: bool = True) -> Domain:
        self.created += 1
        dom = FakeDomain(config)
        self.doms.append(dom)
        return dom

    async def capabilities(self) -> HostCaps:
        return HostCaps(driver="sim", free_memory_bytes=self.free, max_vcpus=64)


def make_domain(mib: int = 8, **kw: Any) -> FakeDomain:
    dom = FakeDomain(DomainConfig(name="web1", memory_mib=mib), **kw)
    dom.fill()
    dom._state = DomainState.RUNNING
    return dom


def context(driver: FakeDriver) -> TargetContext:
    return TargetContext(drivers={"sim": driver}, reservations=ReservationTable(30), journal=None)  # type: ignore[arg-type]


def listing(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.iterdir())


# -- format -------------------------------------------------------------------


def header() -> fmt.FileHeader:
    return fmt.FileHeader(
        name="web1", uuid="6f1c0e4e-1b2a-4c3d-9e8f-001122334455", memory_bytes=256 << 20,
        vcpus=2, driver="sim", writer="0.1.0", created_ns=1_700_000_000_123_456_789,
    )  # fmt: skip


def test_header_round_trip_and_layout() -> None:
    raw = header().pack()
    assert raw[:8] == fmt.MAGIC
    parsed = fmt.parse_header("f", raw + b"rest")
    assert parsed.name == "web1" and parsed.memory_bytes == 256 << 20 and parsed.vcpus == 2
    assert parsed.header_len == len(raw) == 64 + 4 + 3 + 5 + 4
    assert parsed.created == "2023-11-14T22:13:20+00:00"
    assert not parsed.checkpoint


def test_header_refusals() -> None:
    raw = bytearray(header().pack())
    with pytest.raises(SaveFileError, match="not a relocd savefile"):
        fmt.parse_header("f", b"\x7fELF" + bytes(100))
    with pytest.raises(SaveFileError, match="line-ending"):
        fmt.parse_header("f", fmt.MAGIC[:5] + b"\n" + bytes(100))
    newer = bytearray(raw)
    struct.pack_into("!H", newer, 8, fmt.FORMAT_MAJOR + 1)
    with pytest.raises(SaveFileError, match=r"format 2\.0 is a newer major version"):
        fmt.parse_header("f", bytes(newer))
    for at in (12, 20, 33, 40, 65):  # length, page size, memory, uuid, name
        flipped = bytearray(raw)
        flipped[at] ^= 0x04
        with pytest.raises(SaveFileError, match="corrupted header|page size"):
            fmt.parse_header("f", bytes(flipped))
    with pytest.raises(SaveFileError, match="truncated"):
        fmt.parse_header("f", bytes(raw[:40]))


def test_newer_minor_version_header_fields_are_skipped() -> None:
    raw = bytearray(header().pack()[:-4])
    struct.pack_into("!H", raw, 10, fmt.FORMAT_MINOR + 1)
    extra = b"new-field"
    struct.pack_into("!I", raw, 12, len(raw) + len(extra) + 4)
    body = bytes(raw) + extra
    parsed = fmt.parse_header("f", body + struct.pack("!I", __import__("zlib").crc32(body)))
    assert parsed.minor == fmt.FORMAT_MINOR + 1 and parsed.name == "web1"


def test_trailer_round_trip_and_refusals() -> None:
    t = fmt.Trailer(stream_end=1000, digest=bytes(range(32)))
    raw = t.pack()
    assert len(raw) == fmt.TRAILER_SIZE and raw.endswith(fmt.TRAILER_END)
    assert fmt.parse_trailer("f", raw, 1064) == t
    with pytest.raises(SaveFileError, match="truncated or padded"):
        fmt.parse_trailer("f", raw, 2000)
    bad = bytearray(raw)
    bad[30] ^= 1
    with pytest.raises(SaveFileError, match="corrupted trailer"):
        fmt.parse_trailer("f", bytes(bad), 1064)
    with pytest.raises(SaveFileError, match="no trailer"):
        fmt.parse_trailer("f", bytes(64), 1064)


@pytest.mark.parametrize("sizes", [[1], [fmt.CHUNK_SIZE], [3, fmt.CHUNK_SIZE - 3, 7], [fmt.CHUNK_SIZE * 2 + 5, 1]])
def test_chunked_digest_is_independent_of_write_sizes(sizes: list[int], tmp_path: Path) -> None:
    data = np.random.default_rng(7).integers(0, 256, size=sum(sizes), dtype=np.uint8).tobytes()
    d = fmt.ChunkedDigest(max_pending=1)
    at = 0
    for n in sizes:
        d.update([memoryview(data)[at : at + n // 2], data[at + n // 2 : at + n]])
        at += n
    value = d.finish()
    assert value == fmt.simple_digest(data)
    path = tmp_path / "blob"
    path.write_bytes(data + b"ignored")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert fmt.digest_file(fd, len(data)) == value
    finally:
        os.close(fd)
    assert fmt.simple_digest(data[:-1] + bytes([data[-1] ^ 1])) != value


def _doc_table(title: str) -> list[tuple[int, int, str]]:
    """Rows (offset, size, field) of the table under a '### title' heading in docs/savefile.md."""
    text = DOC.read_text()
    section = text.split(f"### {title}", 1)[1].split("\n#", 1)[0]
    rows = []
    for line in section.splitlines():
        m = re.match(r"\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*`?(\w+)`?\s*\|", line)
        if m:
            rows.append((int(m.group(1)), int(m.group(2)), m.group(3)))
    return rows


def test_doc_tables_match_the_code() -> None:
    head = _doc_table("File header")
    assert [r[2] for r in head][:14] == [
        "magic", "major", "minor", "header_len", "flags", "page_size", "created_ns",
        "memory_bytes", "uuid", "vcpus", "name_len", "driver_len", "writer_len", "reserved",
    ]  # fmt: skip
    sizes = [r[1] for r in head[:14]]
    assert struct.calcsize("!" + "".join({8: "Q", 4: "I", 2: "H", 1: "B", 16: "16s"}[s] for s in sizes)) == 64
    assert all(a[0] + a[1] == b[0] for a, b in zip(head, head[1:14]))
    trailer = _doc_table("Trailer")
    assert [(r[0], r[1]) for r in trailer] == [(0, 8), (8, 8), (16, 1), (17, 1), (18, 6), (24, 32), (56, 4), (60, 4)]
    raw = fmt.Trailer(stream_end=0x0102, digest=bytes(32)).pack()
    assert raw[8:16] == (0x0102).to_bytes(8, "big") and raw[16] == fmt.DIGEST_BLAKE3_CHUNKED and raw[17] == 22
    text = DOC.read_text()
    assert fmt.MAGIC.hex(" ") in text and fmt.TRAILER_MAGIC.hex(" ") in text
    example = re.search(r"```hex\n(.*?)```", text, re.S)
    assert example, "docs/savefile.md has a ```hex example of a header"
    doc_bytes = bytes.fromhex(re.sub(r"(?m)^\S+:|\s", "", example.group(1)))
    assert doc_bytes == header().pack()


# -- save and restore ------------------------------------------------------------------


async def test_save_restore_round_trip_with_zero_pages(tmp_path: Path) -> None:
    dom = make_domain(8)
    image = bytes(dom.mem)
    path = tmp_path / "web1.save"
    result = await save_domain(dom, path, checkpoint=False, policy=XendPolicy())
    assert result.status == "completed" and dom.destroyed
    assert listing(tmp_path) == ["web1.save"]
    npages = dom.npages
    zero = len(range(0, npages, 5))
    assert result.zero_pages == zero
    assert path.stat().st_size < (npages - zero + 64) * PAGE_SIZE, "zero pages take no space"
    assert oct(path.stat().st_mode & 0o777) == "0o600"

    info = await inspect_savefile(str(path))
    assert info["digest_ok"] and info["name"] == "web1" and info["memory_mib"] == 8

    driver = FakeDriver()
    restored = await restore_savefile(str(path), context(driver), verify_memory=True)
    assert restored.domain == "web1" and restored.verified_memory
    new = driver.doms[0]
    assert bytes(new.mem) == image and new.loaded == dom.blob
    assert new.name == "web1" and new.state == DomainState.RUNNING
    # the file stays, and restores again once the first copy is gone
    with pytest.raises(RelocdError, match="already exists"):
        await restore_savefile(str(path), context(driver))
    assert driver.created == 1
    await new.destroy()
    await restore_savefile(str(path), context(driver))
    assert bytes(driver.doms[1].mem) == image


async def test_checkpoint_is_the_image_at_the_pause(tmp_path: Path) -> None:
    dom = make_domain(8, writes_per_fetch=40)
    path = tmp_path / "cp.save"
    result = await save_domain(dom, path, checkpoint=True, policy=XendPolicy(max_iterations=4))
    assert result.status == "completed" and not dom.destroyed
    assert dom.state == DomainState.RUNNING and dom.pauses == 1
    assert result.iterations >= 2 and result.pause_ms >= 0
    assert fmt.parse_header("f", path.read_bytes()[:200]).checkpoint
    dom.scribble(50)  # it runs on after the checkpoint
    driver = FakeDriver()
    await dom.destroy()
    await restore_savefile(str(path), context(driver), verify_memory=True)
    assert bytes(driver.doms[0].mem) == dom.snapshot_at_pause
    assert bytes(driver.doms[0].mem) != bytes(dom.mem)


def _corrupt(path: Path, at: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x10
    path.write_bytes(bytes(raw))


async def test_bad_files_are_refused_before_anything_is_created(tmp_path: Path) -> None:
    """What the header and the trailer show is refused before a domain is built."""
    dom = make_domain(4)
    good = tmp_path / "good.save"
    await save_domain(dom, good, checkpoint=False, policy=XendPolicy())
    raw = good.read_bytes()
    size = len(raw)
    cases = {
        "truncated-half": (raw[: size // 2], "truncated"),
        "truncated-trailer": (raw[:-10], "truncated"),
        "no-trailer": (raw[:-64], "truncated|no trailer"),
        "foreign": (b"#!/bin/sh\n" + raw[10:], "not a relocd savefile"),
        "empty": (b"", "truncated"),
    }
    for at, what in ((20, "corrupted header"), (size - 40, "corrupted trailer")):
        flipped = bytearray(raw)
        flipped[at] ^= 0x10
        cases[f"flip-{at}"] = (bytes(flipped), what)
    newer = bytearray(raw)
    struct.pack_into("!H", newer, 8, 9)
    cases["newer"] = (bytes(newer), "newer major version")
    driver = FakeDriver()
    for name, (content, why) in cases.items():
        bad = tmp_path / f"{name}.save"
        bad.write_bytes(content)
        with pytest.raises(SaveFileError, match=why) as info:
            await restore_savefile(str(bad), context(driver))
        assert "\n" not in info.value.message
        info2 = None
        try:
            info2 = await inspect_savefile(str(bad))
        except SaveFileError:
            pass
        assert info2 is None or not info2["digest_ok"]
    assert driver.created == 0


async def _record_offsets(path: Path) -> list[tuple[str, int]]:
    """(record type, file offset of its header) for every record of a savefile."""
    out: list[tuple[str, int]] = []
    with OpenSavefile.open(str(path)) as opened:
        channel = opened.channel()
        reader: Any = channel.transport
        while not out or out[-1][0] != "Commit":
            at = reader.pos
            record = await channel.recv()
            if isinstance(record, PagesHeader):
                await channel.skip_pages(record)
            out.append((type(record).__name__, at))
    return out


def _with_trailer_digest(raw: bytes, digest: bytes, algo: int = fmt.DIGEST_BLAKE3_CHUNKED) -> bytes:
    """``raw`` with its trailer rewritten (a valid CRC) to claim ``digest``."""
    trailer = fmt.Trailer(stream_end=len(raw) - fmt.TRAILER_SIZE, digest=digest, algo=algo)
    return raw[: -fmt.TRAILER_SIZE] + trailer.pack()


async def test_a_file_corrupted_inside_loads_paused_and_never_runs(tmp_path: Path) -> None:
    """Verify while loading (docs/savefile.md, Reading safely): the domain is built and
    loaded paused while the digest is checked; a mismatch destroys it before it ever runs,
    releases its reservation, and says so in one line, wherever the damage is."""
    dom = make_domain(8)  # two PAGES records
    good = tmp_path / "good.save"
    await save_domain(dom, good, checkpoint=False, policy=XendPolicy())
    raw = good.read_bytes()
    size = len(raw)
    offsets = await _record_offsets(good)
    second_pages = [at for kind, at in offsets if kind == "PagesHeader"][1]
    vcpu = next(at for kind, at in offsets if kind == "VcpuState")
    cases: dict[str, bytes] = {}
    for label, at in (("payload", size // 2), ("pages-header", second_pages + 20), ("vcpu-state", vcpu + 14)):
        flipped = bytearray(raw)
        flipped[at] ^= 0x10
        cases[label] = bytes(flipped)
    cases["trailer-digest"] = _with_trailer_digest(raw, bytes(32))
    for label, content in cases.items():
        bad = tmp_path / f"{label}.save"
        bad.write_bytes(content)
        driver = FakeDriver()
        ctx = context(driver)
        with pytest.raises(SaveFileError, match="digest mismatch") as info:
            await restore_savefile(str(bad), ctx)
        assert "\n" not in info.value.message, label
        assert info.value.message == f"{bad}: corrupted savefile (digest mismatch)", label
        assert all(d.destroyed and d.resumes == 0 and d.loaded is None for d in driver.doms), label
        assert driver.domains() == [] and not ctx.incoming, f"{label}: something was left behind"
        assert ctx.reservations.reserved_bytes == 0 and not ctx.reservations.names, label
        assert not (await inspect_savefile(str(bad)))["digest_ok"]
    # and the good file still restores, into the same kind of context
    driver = FakeDriver()
    await restore_savefile(str(good), context(driver))
    assert driver.doms[0].resumes == 1 and bytes(driver.doms[0].mem) == bytes(dom.snapshot_at_pause or b"")


async def test_files_of_the_older_digest_algorithm_still_restore(tmp_path: Path) -> None:
    """A file whose trailer uses algorithm 1 (SHA-256 hash list, as older relocd wrote)
    restores through the same load-and-verify path; format 1.0 itself is unchanged."""
    dom = make_domain(8)
    path = tmp_path / "old.save"
    await save_domain(dom, path, checkpoint=False, policy=XendPolicy())
    raw = path.read_bytes()
    body = raw[: -fmt.TRAILER_SIZE]
    path.write_bytes(_with_trailer_digest(raw, fmt.simple_digest(body, fmt.DIGEST_SHA256_CHUNKED), fmt.DIGEST_SHA256_CHUNKED))
    assert fmt.parse_header("f", raw[:200]).major == 1 and fmt.parse_header("f", raw[:200]).minor == 0
    driver = FakeDriver()
    restored = await restore_savefile(str(path), context(driver), verify_memory=True)
    assert restored.verified_memory and bytes(driver.doms[0].mem) == dom.snapshot_at_pause
    # the same file, damaged, is refused as any other
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 1
    path.write_bytes(bytes(damaged))
    await driver.doms[0].destroy()
    with pytest.raises(SaveFileError, match="digest mismatch"):
        await restore_savefile(str(path), context(driver))
    assert driver.domains() == []


async def test_restore_refused_when_memory_is_short(tmp_path: Path) -> None:
    dom = make_domain(8)
    path = tmp_path / "big.save"
    await save_domain(dom, path, checkpoint=False, policy=XendPolicy())
    driver = FakeDriver(free=4 << 20)
    with pytest.raises(RelocdError, match="not enough memory"):
        await restore_savefile(str(path), context(driver))
    assert driver.created == 0


async def test_failed_write_leaves_no_file_and_the_domain_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dom = make_domain(8)
    real = os.writev
    calls = {"n": 0}

    def failing(fd: int, bufs: Any) -> int:
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, bufs)

    monkeypatch.setattr(os, "writev", failing)
    with pytest.raises(SaveFileError, match="No space left on device"):
        await save_domain(dom, tmp_path / "x.save", checkpoint=False, policy=XendPolicy())
    assert listing(tmp_path) == []
    assert dom.state == DomainState.RUNNING and not dom.destroyed


async def test_save_into_missing_directory(tmp_path: Path) -> None:
    dom = make_domain(4)
    with pytest.raises(SaveFileError, match="no directory"):
        await save_domain(dom, tmp_path / "nope" / "x.save", checkpoint=False, policy=XendPolicy())
    assert dom.state == DomainState.RUNNING


async def record_kinds(path: Path) -> list[str]:
    """The records of a savefile from CONFIG to COMMIT, by type (with their round), repeats folded."""
    out: list[str] = []
    with OpenSavefile.open(str(path)) as opened:
        channel = opened.channel()
        while not out or out[-1] != "Commit":
            record = await channel.recv()
            if isinstance(record, PagesHeader):
                await channel.skip_pages(record)
            name = type(record).__name__
            if isinstance(record, PagesHeader | EndRound | Stop):
                name += f"({record.round})"
            if not out or out[-1] != name:
                out.append(name)
            if isinstance(record, Commit):
                break
    return out


async def test_each_kind_of_page_save_writes_its_records_in_order(tmp_path: Path) -> None:
    """The page transfer's save (transfer_save.PagedSave): live checkpoint, or stop-and-copy."""
    dom = make_domain(8, writes_per_fetch=40)
    result = await save_domain(dom, tmp_path / "cp.save", checkpoint=True, policy=XendPolicy(max_iterations=4))
    last = result.iterations
    assert last >= 2
    rounds = [f"{kind}({n})" for n in range(1, last) for kind in ("PagesHeader", "EndRound")]
    assert await record_kinds(tmp_path / "cp.save") == [
        "Config", *rounds, f"Stop({last})", f"PagesHeader({last})", "VcpuState", "Digest", "Commit",
    ]  # fmt: skip
    stop_and_copy = ["Config", "Stop(1)", "PagesHeader(1)", "VcpuState", "Digest", "Commit"]
    paused = make_domain(4)
    paused._state = DomainState.PAUSED
    result = await save_domain(paused, tmp_path / "paused-cp.save", checkpoint=True, policy=XendPolicy())
    assert result.iterations == 1 and result.pause_ms == 0.0 and paused.pauses == 0 and not paused.destroyed
    assert await record_kinds(tmp_path / "paused-cp.save") == stop_and_copy
    result = await save_domain(make_domain(4), tmp_path / "plain.save", checkpoint=False, policy=XendPolicy())
    assert result.iterations == 1
    assert await record_kinds(tmp_path / "plain.save") == stop_and_copy


@pytest.mark.parametrize("writes", [4, 7], ids=["during-precopy", "while-paused"])
async def test_failed_checkpoint_puts_the_domain_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writes: int
) -> None:
    """A checkpoint's undo: no file, the dirty log off, the domain running (paused at most once)."""
    dom = make_domain(8, writes_per_fetch=40)
    real = os.writev
    calls = {"n": 0}

    def failing(fd: int, bufs: Any) -> int:
        calls["n"] += 1
        if calls["n"] > writes:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, bufs)

    monkeypatch.setattr(os, "writev", failing)
    with pytest.raises(SaveFileError, match="No space left on device"):
        await save_domain(dom, tmp_path / "cp.save", checkpoint=True, policy=XendPolicy(max_iterations=4))
    assert listing(tmp_path) == []
    assert dom.state == DomainState.RUNNING and not dom.logging and not dom.destroyed
    assert dom.pauses == (0 if writes == 4 else 1)


def test_sha256_files_are_still_read(tmp_path: Path) -> None:
    """Algorithm 1 (the SHA-256 hash list) stays readable; BLAKE3 is what we write."""
    import hashlib

    data = bytes(range(256)) * 40000  # ~10 MiB: several chunks
    path = tmp_path / "f"
    path.write_bytes(data)
    with open(path, "rb") as f:
        assert fmt.digest_file(f.fileno(), len(data), algo=fmt.DIGEST_SHA256_CHUNKED) == fmt.simple_digest(
            data, fmt.DIGEST_SHA256_CHUNKED
        )
        assert fmt.digest_file(f.fileno(), len(data)) == fmt.simple_digest(data)
    first = hashlib.sha256(data[: fmt.CHUNK_SIZE]).digest()
    assert fmt.simple_digest(data, fmt.DIGEST_SHA256_CHUNKED) != fmt.simple_digest(data)
    assert fmt._hash_pieces([data[: fmt.CHUNK_SIZE]], fmt.DIGEST_SHA256_CHUNKED) == first
    raw = fmt.Trailer(stream_end=100, digest=bytes(32), algo=fmt.DIGEST_SHA256_CHUNKED).pack()
    assert fmt.parse_trailer("f", raw, 164).algo == fmt.DIGEST_SHA256_CHUNKED


async def test_a_save_over_an_older_savefile_replaces_it(tmp_path: Path) -> None:
    """The replaced file is let go off the save's path (savefile._hold_replaced); a FIFO
    in its place does not block the save, and nothing but the new file is left."""
    from relocd.engine.savefile import _hold_replaced

    path = tmp_path / "web1.save"
    first = make_domain(4, seed=1)
    await save_domain(first, path, checkpoint=False, policy=XendPolicy())
    second = make_domain(4, seed=2)
    await save_domain(second, path, checkpoint=False, policy=XendPolicy())
    driver = FakeDriver()
    await restore_savefile(str(path), context(driver))
    assert bytes(driver.doms[0].mem) == second.snapshot_at_pause != first.snapshot_at_pause
    assert listing(tmp_path) == ["web1.save"]
    assert _hold_replaced(tmp_path / "missing") == -1
    fifo = tmp_path / "fifo.save"
    os.mkfifo(fifo)
    await save_domain(make_domain(4), fifo, checkpoint=False, policy=XendPolicy())
    assert fifo.is_file() and not fifo.is_fifo()
