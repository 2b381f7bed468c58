"""Crash points (relocd/engine/faults.py): the fault spec, the names, the trace, kill and hold.

Kills and traces are read from the environment at import, so those run in a
child process; the names are checked in-process with a watch that records.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from relocd.engine import faults
from relocd.engine.faults import Fault, PointWatch, RecordPoints, parse_fault
from relocd.engine.journal import Journal
from relocd.engine.stream import RecordChannel, memory_pipe
from relocd.protocol.records import EndRound, PagesHeader, RecordType, Role, Stop, StreamChunk
from relocd.protocol.state import Conversation
from relocd.units import PAGE_SIZE


class RecordingWatch(PointWatch):
    def __init__(self) -> None:
        super().__init__(None)
        self.reached: list[str] = []

    def reach(self, side: str, name: str) -> None:
        self.reached.append(f"{side} {name}")


def test_fault_spec_keeps_phases_and_takes_names_with_colons() -> None:
    assert parse_fault("target:prepared:kill") == Fault("target", "prepared", "kill")
    assert parse_fault("source:journal:go-sent:done:hold") == Fault("source", "journal:go-sent:done", "hold")
    assert parse_fault("source:send:PAGES@2:stall") == Fault("source", "send:PAGES@2", "stall")
    assert parse_fault("") is None
    assert parse_fault("source:go") is None
    assert parse_fault("source:go:explode") is None


def test_nothing_is_watched_without_a_crash_point_fault_or_a_trace() -> None:
    assert PointWatch.from_env({}) is None
    assert PointWatch.from_env({"RELOCD_FAULT": "source:go:kill"}) is None  # a phase: fault_point's
    watch = PointWatch.from_env({"RELOCD_FAULT": "source:journal:begin:kill"})
    assert watch is not None and watch.fault == Fault("source", "journal:begin", "kill")
    watch = PointWatch.from_env({"RELOCD_FAULT_TRACE": "/tmp/x"})
    assert watch is not None and watch.fault is None
    # and in this (test) process nothing is watched: channels get no points
    assert faults.WATCH is None
    assert faults.record_points(Conversation(Role.SOURCE)) is None


def test_repeating_records_are_points_a_bounded_number_of_times() -> None:
    watch = RecordingWatch()
    points = RecordPoints(watch, "source")
    sequence = (
        [RecordType.HELLO, RecordType.CONFIG]
        + [RecordType.PAGES] * 3 + [RecordType.END_ROUND]
        + [RecordType.PAGES] * 3 + [RecordType.END_ROUND]
        + [RecordType.PAGES] * 3 + [RecordType.END_ROUND]
        + [RecordType.STOP] + [RecordType.PAGES] * 3 + [RecordType.COMMIT]
    )  # fmt: skip
    for rtype in sequence:
        points.sending(rtype)
        points.sent()
    points.received(RecordType.HELLO)
    points.received(RecordType.PREPARED)
    sends = [r.split(" ", 1)[1] for r in watch.reached if not r.endswith(":done")]
    assert sends == [
        "send:HELLO", "send:CONFIG", "send:PAGES@1", "send:END_ROUND@1", "send:PAGES@2",
        "send:END_ROUND@2", "send:STOP", "send:PAGES@stop", "send:COMMIT", "recv:HELLO", "recv:PREPARED",
    ]  # fmt: skip
    dones = [r.split(" ", 1)[1] for r in watch.reached if r.endswith(":done")]
    assert dones == [s + ":done" for s in sends if s.startswith("send:")]
    assert {r.split(" ", 1)[0] for r in watch.reached} == {"source"}


async def test_channels_reach_record_points_on_both_sides(monkeypatch: pytest.MonkeyPatch) -> None:
    watch = RecordingWatch()
    monkeypatch.setattr(faults, "WATCH", watch)
    src_t, dst_t = memory_pipe()
    src = RecordChannel(src_t, Conversation(Role.QUERY), max_frame=1 << 20)  # QUERY: the source side
    dst = RecordChannel(dst_t, Conversation(Role.TARGET), max_frame=1 << 20)
    for ch in (src, dst):  # records out of any conversation's order: the points are what is checked
        ch.conversation.send = lambda record: None  # type: ignore[method-assign]
        ch.conversation.check_incoming_type = lambda t: None  # type: ignore[method-assign]
        ch.conversation.receive = lambda record: None  # type: ignore[method-assign]
    memory = memoryview(bytearray(4 * PAGE_SIZE))
    pfns = np.array([0, 1], dtype=np.uint64)
    await src.send_pages(1, pfns, np.array([], dtype=np.uint64), memory)
    await src.send(EndRound(1, 2, 0))
    await src.send(Stop(2))
    await src.send(StreamChunk(b"x"))
    for _ in range(4):
        record = await dst.recv()
        if isinstance(record, PagesHeader):
            await dst.recv_pages_into(record, memoryview(bytearray(4 * PAGE_SIZE)))
    assert watch.reached == [
        "source send:PAGES@1", "source send:PAGES@1:done", "source send:END_ROUND@1", "source send:END_ROUND@1:done",
        "source send:STOP", "source send:STOP:done", "source send:STREAM@stop", "source send:STREAM@stop:done",
        "target recv:PAGES@1", "target recv:END_ROUND@1", "target recv:STOP", "target recv:STREAM@stop",
    ]  # fmt: skip


def test_a_savefile_has_no_record_points(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(faults, "WATCH", RecordingWatch())
    assert faults.record_points(Conversation(Role.SOURCE, savefile=True)) is None
    points = faults.record_points(Conversation(Role.TARGET))
    assert points is not None and points.side == "target"


_JOURNAL_CHILD = """
import sys
from pathlib import Path
from relocd.engine.journal import Journal, Phase
j = Journal(Path(sys.argv[1]))
j.begin("m1", "source", "web", "u", "b:1", True)
j.set_phase("m1", Phase.RESERVED)
j.finish("m1", "failed", "x")
print("survived")
"""


def _journal_child(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _JOURNAL_CHILD, str(tmp_path / "journal.sqlite")],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[2]), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_trace_lists_every_journal_point_before_and_after(tmp_path: Path) -> None:
    trace = tmp_path / "trace.txt"
    child = _journal_child(tmp_path, {"RELOCD_FAULT_TRACE": str(trace)})
    assert child.returncode == 0 and "survived" in child.stdout, child.stderr
    assert trace.read_text().splitlines() == [
        "source journal:begin", "source journal:begin:done",
        "source journal:reserved", "source journal:reserved:done",
        "source journal:finish:failed", "source journal:finish:failed:done",
    ]  # fmt: skip


@pytest.mark.parametrize(("point", "phase_on_disk"), [("journal:reserved", "started"), ("journal:reserved:done", "reserved")])
def test_a_kill_before_a_write_leaves_it_undone_and_after_it_durable(
    tmp_path: Path, point: str, phase_on_disk: str
) -> None:
    trace = tmp_path / "trace.txt"
    child = _journal_child(tmp_path, {"RELOCD_FAULT": f"source:{point}:kill", "RELOCD_FAULT_TRACE": str(trace)})
    assert child.returncode == -9, (child.returncode, child.stderr)
    assert trace.read_text().splitlines()[-1] == f"source {point}"
    entry = Journal(tmp_path / "journal.sqlite").get("m1")
    assert entry is not None and entry.phase.value == phase_on_disk and not entry.finished


def test_a_held_point_waits_for_the_harness(tmp_path: Path) -> None:
    path = tmp_path / "hold.sock"
    heard: list[str] = []
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen(1)

        def desk() -> None:
            conn, _ = server.accept()
            with conn:
                heard.append(conn.makefile().readline().strip())
                conn.sendall(b"go\n")

        t = threading.Thread(target=desk)
        t.start()
        child = _journal_child(
            tmp_path, {"RELOCD_FAULT": "source:journal:begin:done:hold", "RELOCD_FAULT_HOLD": str(path)}
        )
        t.join(10)
    assert child.returncode == 0 and "survived" in child.stdout, child.stderr
    assert len(heard) == 1 and heard[0].startswith("source journal:begin:done ")
