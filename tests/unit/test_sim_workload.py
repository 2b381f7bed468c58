"""Workload specs, the page invariant and the in-process guest (no domain processes here)."""

from __future__ import annotations

import mmap
import time

import numpy as np
import pytest

from relocd.drivers.sim import invariant
from relocd.drivers.sim import status as status_area
from relocd.drivers.sim.guest import Guest, GuestError
from relocd.drivers.sim.workload import PagePicker, PageWriter, WorkloadProgress, WorkloadSpec, parse_workload
from relocd.errors import ConfigError
from relocd.units import PAGE_SIZE

NPAGES = 4096  # 16 MiB: 8 table pages, 4088 data pages


# ------------------------------------------------------------------ spec parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("idle", WorkloadSpec("idle", 0, 0, "stamped")),
        ("idle:fill=zero", WorkloadSpec("idle", 0, 0, "zero")),
        ("uniform:rate=100MB/s", WorkloadSpec("uniform", 100_000_000, 0, "stamped")),
        ("hotset:size=64MiB,rate=200MB/s", WorkloadSpec("hotset", 200_000_000, 64 << 20, "stamped")),
        ("HOTSET: rate=1MiB/s , size=8MiB", WorkloadSpec("hotset", 1 << 20, 8 << 20, "stamped")),
        ("sweep:rate=1GB/s", WorkloadSpec("sweep", 1_000_000_000, 0, "stamped")),
        ("sweep:rate=1GB/s,fill=zero", WorkloadSpec("sweep", 1_000_000_000, 0, "zero")),
        ("uniform", WorkloadSpec("uniform", 100_000_000, 0, "stamped")),
        ("hotset", WorkloadSpec("hotset", 200_000_000, 64 << 20, "stamped")),
    ],
)
def test_parse_good_specs(text: str, expected: WorkloadSpec) -> None:
    spec = parse_workload(text)
    assert spec == expected
    assert parse_workload(str(spec)) == spec


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "unknown kind"),
        ("bursty:rate=1MB/s", "unknown kind 'bursty'"),
        ("idle:rate=1MB/s", "takes no option 'rate'"),
        ("uniform:size=1MiB", "takes no option 'size'"),
        ("uniform:rate", "expected key=value"),
        ("uniform:rate=", "expected key=value"),
        ("uniform:", "expected key=value"),
        ("uniform:rate=fast", "bad rate"),
        ("uniform:rate=0MB/s", "rate must be positive"),
        ("uniform:rate=1MB/s,rate=2MB/s", "given twice"),
        ("hotset:size=12parsecs", "bad size"),
        ("hotset:size=100", "at least one page"),
        ("sweep:fill=random", "fill must be one of"),
    ],
)
def test_parse_bad_specs(text: str, complaint: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_workload(text)
    assert complaint in info.value.message
    assert "\n" not in info.value.message


# ------------------------------------------------------------------ page invariant


@pytest.fixture
def memory() -> memoryview:
    return memoryview(bytearray(NPAGES * PAGE_SIZE))


def booted(memory: memoryview, fill: str = "stamped") -> PageWriter:
    writer = PageWriter(memory, NPAGES)
    writer.boot("stamped" if fill == "stamped" else "zero")
    return writer


def test_table_layout() -> None:
    assert invariant.table_pages(NPAGES) == 8
    assert invariant.table_pages(1) == 1
    assert invariant.table_pages(513) == 2


def test_stamped_memory_is_valid_and_nonzero(memory: memoryview) -> None:
    writer = booted(memory)
    words = invariant.page_words(memory, NPAGES)
    data = words[writer.first_data_page :]
    assert (data[:, invariant.INDEX_WORD] == np.arange(writer.first_data_page, NPAGES)).all()
    assert (data[:, invariant.GEN_WORD] == 1).all()
    assert np.count_nonzero(data) > 0.99 * data.size  # pseudo-random body, not padding
    assert invariant.check_invariant(memory, NPAGES) is None


def test_zero_memory_is_valid(memory: memoryview) -> None:
    booted(memory, "zero")
    assert invariant.check_invariant(memory, NPAGES) is None


def test_writes_keep_the_invariant_and_bump_generations(memory: memoryview) -> None:
    writer = booted(memory, "zero")
    writer.write_pages(np.array([100, 200, 200, 300], dtype=np.uint64))
    writer.write_run(1000, 50)
    writer.write_run(1000, 10)
    table = invariant.generation_table(memory, NPAGES)
    assert table[100] == 1 and table[200] == 1 and table[1005] == 2 and table[1040] == 1 and table[99] == 0
    assert invariant.check_invariant(memory, NPAGES) is None


def test_torn_page_is_caught(memory: memoryview) -> None:
    booted(memory)
    words = invariant.page_words(memory, NPAGES)
    words[500, 300] ^= np.uint64(1 << 17)
    report = invariant.check_invariant(memory, NPAGES)
    assert report is not None and "page 500 is torn" in report and report.startswith("1 bad page")


def test_stale_page_is_caught(memory: memoryview) -> None:
    writer = booted(memory)
    words = invariant.page_words(memory, NPAGES)
    old = words[700].copy()
    writer.write_pages(np.array([700], dtype=np.uint64))  # generation 2, table says 2
    words[700] = old  # a migration that missed the last write
    report = invariant.check_invariant(memory, NPAGES)
    assert report is not None and "page 700 is stale: generation 1, table says 2" in report


def test_stale_table_is_caught(memory: memoryview) -> None:
    writer = booted(memory)
    table = invariant.generation_table(memory, NPAGES)
    writer.write_pages(np.array([701], dtype=np.uint64))
    table[701] = 1  # the table page was missed instead
    report = invariant.check_invariant(memory, NPAGES)
    assert report is not None and "page 701" in report and "generation 2, table says 1" in report


def test_wrong_index_is_caught(memory: memoryview) -> None:
    booted(memory)
    words = invariant.page_words(memory, NPAGES)
    words[900] = words[901]  # page 901's contents landed at 900
    report = invariant.check_invariant(memory, NPAGES)
    assert report is not None and "page 900 holds page 901's contents" in report


def test_lost_and_unexpected_pages_are_caught(memory: memoryview) -> None:
    booted(memory)
    words = invariant.page_words(memory, NPAGES)
    words[1234] = 0
    words[2000:2010] = 0
    report = invariant.check_invariant(memory, NPAGES)
    assert report is not None and report.startswith("11 bad pages") and "page 1234 is zero" in report
    assert "(and 8 more)" in report

    fresh = memoryview(bytearray(NPAGES * PAGE_SIZE))
    booted(fresh, "zero")
    invariant.page_words(fresh, NPAGES)[3000, 7] = 1
    report = invariant.check_invariant(fresh, NPAGES)
    assert report is not None and "page 3000 should be zero" in report


def test_check_is_fast_enough() -> None:
    npages = 32768  # 128 MiB
    memory = memoryview(mmap.mmap(-1, npages * PAGE_SIZE))
    PageWriter(memory, npages).boot("stamped")
    start = time.perf_counter()
    assert invariant.check_invariant(memory, npages) is None
    assert time.perf_counter() - start < 2.0


# ------------------------------------------------------------------ page picking


def test_hotset_and_sweep_pick_the_right_pages(memory: memoryview) -> None:
    writer = PageWriter(memory, NPAGES)
    progress = WorkloadProgress(rng=np.random.default_rng(1))
    hot = PagePicker(parse_workload("hotset:size=1MiB,rate=1MB/s"), writer)
    pages = hot.random_pages(progress, 10_000)
    assert pages.min() == writer.first_data_page and pages.max() == writer.first_data_page + 255

    sweep = PagePicker(parse_workload("sweep:rate=1MB/s"), writer)
    progress.sweep_pos = writer.data_pages - 3
    assert sweep.sweep_runs(progress, 5) == [(NPAGES - 3, 3), (writer.first_data_page, 2)]
    assert progress.sweep_pos == 2
    assert not PagePicker(parse_workload("idle"), writer).writes_anything


# ------------------------------------------------------------------ the guest (dirty log, pause, state)


def make_guest(spec: str, npages: int = NPAGES, *, boot: bool = True) -> Guest:
    memory = mmap.mmap(-1, npages * PAGE_SIZE)
    status = mmap.mmap(-1, status_area.area_size(npages))
    guest = Guest(memory, status, npages, parse_workload(spec), seed=7)
    if boot:
        guest.boot()
    return guest


def snapshot_pages(guest: Guest) -> np.ndarray:
    bitmap = np.frombuffer(guest._status, dtype="<u8", offset=status_area.BITMAP_OFFSET,
                           count=status_area.bitmap_words(guest.npages))  # fmt: skip
    return np.flatnonzero(np.unpackbits(bitmap.view(np.uint8), bitorder="little"))


def test_dirty_log_reports_written_pages_and_their_table_pages() -> None:
    guest = make_guest("uniform:rate=1MB/s")
    guest.dirty_start()
    guest.running = True
    with guest.lock:
        guest._write_chunk(3)
    written = np.flatnonzero(invariant.generation_table(memoryview(guest._memory), NPAGES) == 2)
    assert guest.dirty_fetch() == len(set(written.tolist()) | {int(p) >> 9 for p in written})
    dirty = set(snapshot_pages(guest).tolist())
    assert set(written.tolist()) <= dirty and {int(p) >> 9 for p in written} <= dirty
    assert guest.dirty_fetch() == 0 and len(snapshot_pages(guest)) == 0  # fetch cleared it


def test_dirty_fetch_needs_a_started_log() -> None:
    with pytest.raises(GuestError, match="not started"):
        make_guest("idle", boot=False).dirty_fetch()


def test_no_write_is_lost_while_fetching_concurrently() -> None:
    """Fetch-and-clear racing the writer: every page whose generation moved was reported."""
    guest = make_guest("uniform:rate=400MB/s")
    table = invariant.generation_table(memoryview(guest._memory), NPAGES)
    before = table.copy()
    seen = np.zeros(NPAGES, dtype=bool)
    guest.dirty_start()
    guest.start_thread()
    guest.resume()
    try:
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            guest.dirty_fetch()
            seen[snapshot_pages(guest)] = True
        guest.pause()
        guest.dirty_fetch()
        seen[snapshot_pages(guest)] = True
    finally:
        guest.stop_thread()
    changed = np.flatnonzero(table != before)
    assert len(changed) > 100
    assert seen[changed].all()
    assert invariant.check_invariant(memoryview(guest._memory), NPAGES) is None


def test_pause_stops_the_writer_and_state_round_trips() -> None:
    guest = make_guest("sweep:rate=200MB/s")
    guest.start_thread()
    try:
        guest.resume()
        time.sleep(0.1)
        with pytest.raises(GuestError, match="paused"):
            guest.save_state()
        guest.pause()
        header = status_area.StatusHeader.read(guest._status)
        digest = bytes(guest._memory[:])
        time.sleep(0.05)
        assert bytes(guest._memory[:]) == digest
        assert status_area.StatusHeader.read(guest._status) == header
        assert header.pages_written > 0 and not header.running
        blob = guest.save_state()
    finally:
        guest.stop_thread()

    other = make_guest("sweep:rate=200MB/s", boot=False)
    other.load_state(blob)
    assert other.progress.pages_written == header.pages_written
    assert other.progress.sweep_pos == header.sweep_pos
    assert other.progress.rng.integers(1 << 30) == guest.progress.rng.integers(1 << 30)
    for bad, complaint in [
        ("nope", "not valid JSON"),
        ('{"driver": "kvm"}', "not saved by the sim driver"),
        (blob.replace('"format":1', '"format":99'), "format 99"),
        (blob.replace(f'"npages":{NPAGES}', '"npages":8'), "8 pages"),
    ]:
        with pytest.raises(GuestError, match=complaint):
            other.load_state(bad)


def test_guest_lock_is_not_held_between_chunks() -> None:
    """pause() must get the lock quickly even at a high write rate."""
    guest = make_guest("uniform:rate=2GB/s")
    guest.start_thread()
    try:
        guest.resume()
        time.sleep(0.05)
        start = time.perf_counter()
        guest.pause()
        assert time.perf_counter() - start < 0.2
    finally:
        guest.stop_thread()
