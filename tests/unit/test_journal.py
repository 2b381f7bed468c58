"""The migration journal: durable, forward-only, and clear about broken files."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from relocd.engine import journal as journal_mod
from relocd.engine.journal import Journal, JournalEntry, Phase
from relocd.errors import RelocdError

UUID = "6f9619ff-8b86-d011-b42d-00cf4fc964ff"


class Ticker:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        self.now += 1
        return self.now


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "journal.sqlite"


@pytest.fixture
def journal(path: Path) -> Iterator[Journal]:
    j = Journal(path, clock=Ticker())
    yield j
    j.close()


def begin(j: Journal, mid: str, role: str = "source", domain: str = "web1") -> None:
    j.begin(mid, role, domain, UUID, "10.0.0.2:8002", True)


def test_begin_and_get(journal: Journal) -> None:
    begin(journal, "m1")
    entry = journal.get("m1")
    assert isinstance(entry, JournalEntry)
    assert (entry.role, entry.domain, entry.uuid, entry.peer, entry.live) == (
        "source", "web1", UUID, "10.0.0.2:8002", True
    )
    assert entry.phase == Phase.STARTED and entry.outcome is None and not entry.finished
    assert journal.get("nope") is None
    begin(journal, "t1", role="target")
    assert journal.get("t1").phase == Phase.RECEIVING  # type: ignore[union-attr]


def test_full_source_life(journal: Journal) -> None:
    begin(journal, "m1")
    for phase in (
        Phase.RESERVED, Phase.STREAMING, Phase.STOPPED, Phase.PREPARED, Phase.GO_SENT, Phase.DONE
    ):
        journal.set_phase("m1", phase)
        assert journal.get("m1").phase == phase  # type: ignore[union-attr]
    journal.finish("m1", "completed")
    entry = journal.get("m1")
    assert entry is not None and entry.outcome == "completed" and entry.error is None
    assert entry.finished_at is not None and entry.started_at < entry.updated_at


def test_phases_may_skip_forward_and_repeat(journal: Journal) -> None:
    begin(journal, "m1")
    journal.set_phase("m1", Phase.STOPPED)  # non-live: no streaming rounds
    journal.set_phase("m1", Phase.STOPPED)
    assert journal.get("m1").phase == Phase.STOPPED  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "role, reached, back",
    [
        ("source", Phase.GO_SENT, Phase.PREPARED),
        ("source", Phase.STREAMING, Phase.STARTED),
        ("source", Phase.DONE, Phase.ABORTED),
        ("source", Phase.ABORTED, Phase.STREAMING),
        ("target", Phase.PREPARED, Phase.RECEIVING),
        ("target", Phase.RESUMED, Phase.ABORTED),
        ("target", Phase.RECEIVING, Phase.GO_SENT),  # not a target phase
        ("source", Phase.STARTED, Phase.RESUMED),  # not a source phase
    ],
)
def test_refuses_going_backwards(journal: Journal, role: str, reached: Phase, back: Phase) -> None:
    begin(journal, "m1", role=role)
    journal.set_phase("m1", reached)
    with pytest.raises(RelocdError, match="cannot go from"):
        journal.set_phase("m1", back)
    assert journal.get("m1").phase == reached  # type: ignore[union-attr]


@pytest.mark.parametrize("reached", [Phase.STARTED, Phase.STOPPED, Phase.GO_SENT])
def test_source_may_abort_before_done(journal: Journal, reached: Phase) -> None:
    begin(journal, "m1")
    journal.set_phase("m1", reached)
    journal.set_phase("m1", Phase.ABORTED)
    journal.finish("m1", "rolled-back", "target failed to resume")
    entry = journal.get("m1")
    assert entry is not None and entry.phase == Phase.ABORTED
    assert entry.error == "target failed to resume"


def test_finished_entries_are_frozen(journal: Journal) -> None:
    begin(journal, "m1")
    journal.finish("m1", "failed", "peer vanished")
    with pytest.raises(RelocdError, match="finished"):
        journal.set_phase("m1", Phase.RESERVED)
    with pytest.raises(RelocdError, match="already finished"):
        journal.finish("m1", "completed")


def test_misuse_is_refused(journal: Journal) -> None:
    with pytest.raises(RelocdError, match="no migration"):
        journal.set_phase("ghost", Phase.RESERVED)
    with pytest.raises(RelocdError, match="no migration"):
        journal.finish("ghost", "completed")
    with pytest.raises(RelocdError, match="unknown role"):
        journal.begin("m1", "bystander", "web1", UUID, "peer", False)
    begin(journal, "m1")
    with pytest.raises(RelocdError, match="already recorded"):
        begin(journal, "m1")


def test_unfinished_and_recent(journal: Journal) -> None:
    begin(journal, "s1")
    begin(journal, "t1", role="target", domain="db")
    begin(journal, "s2", domain="mail")
    journal.finish("s1", "completed")
    assert [e.migration_id for e in journal.unfinished()] == ["t1", "s2"]
    assert [e.migration_id for e in journal.unfinished("source")] == ["s2"]
    assert [e.migration_id for e in journal.unfinished("target")] == ["t1"]
    assert [e.migration_id for e in journal.recent()] == ["s2", "t1", "s1"]
    assert [e.migration_id for e in journal.recent(limit=1)] == ["s2"]


def test_survives_close_and_reopen(path: Path) -> None:
    j = Journal(path)
    begin(j, "m1")
    j.set_phase("m1", Phase.GO_SENT)
    begin(j, "m2")
    j.finish("m2", "completed")
    j.close()
    again = Journal(path)
    try:
        entry = again.get("m1")
        assert entry is not None and entry.phase == Phase.GO_SENT
        assert [e.migration_id for e in again.unfinished()] == ["m1"]
        again.set_phase("m1", Phase.DONE)  # the new daemon carries on
    finally:
        again.close()


def test_each_call_is_committed_when_it_returns(journal: Journal, path: Path) -> None:
    begin(journal, "m1")
    journal.set_phase("m1", Phase.GO_SENT)
    other = sqlite3.connect(str(path))
    try:
        row = other.execute("SELECT phase FROM migrations WHERE migration_id='m1'").fetchone()
        assert row == ("go-sent",)
        sync = journal._db.execute("PRAGMA synchronous").fetchone()[0]
        mode = journal._db.execute("PRAGMA journal_mode").fetchone()[0]
        assert (sync, mode) == (2, "wal")  # FULL, WAL
    finally:
        other.close()


def test_survives_a_process_that_dies_without_closing(path: Path) -> None:
    code = (
        "import os, sys; from pathlib import Path; from relocd.engine.journal import Journal, Phase;"
        "j = Journal(Path(sys.argv[1])); j.begin('m1', 'source', 'web1', 'u', 'peer', True);"
        "j.set_phase('m1', Phase.GO_SENT); os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=60)
    j = Journal(path)
    try:
        assert j.get("m1").phase == Phase.GO_SENT  # type: ignore[union-attr]
    finally:
        j.close()


def test_garbage_file_is_a_clear_error(path: Path) -> None:
    path.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(RelocdError, match="corrupted") as info:
        Journal(path)
    assert str(path) in info.value.message and "\n" not in info.value.message


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RelocdError, match="journal"):
        Journal(tmp_path / "no" / "such" / "dir" / "journal.sqlite")


def test_locked_database_is_a_clear_error(
    journal: Journal, path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_mod, "LOCK_TIMEOUT_S", 0.05)
    second = Journal(path)
    holder = sqlite3.connect(str(path), isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        with pytest.raises(RelocdError, match="locked"):
            begin(second, "m1")
        holder.execute("ROLLBACK")
        begin(second, "m1")  # usable again once the lock is gone
    finally:
        holder.close()
        second.close()


def test_newer_schema_is_refused(path: Path) -> None:
    Journal(path).close()
    db = sqlite3.connect(str(path))
    db.execute("PRAGMA user_version=99")
    db.commit()
    db.close()
    with pytest.raises(RelocdError, match="newer relocd"):
        Journal(path)
