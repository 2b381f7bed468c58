"""Durable record of where each migration stands, so a restarted daemon can finish it.

The one rule that matters: the source journals ``go-sent`` *before* it sends
GO, and a journal call returns only once the row is on disk (SQLite in WAL
mode with ``synchronous=FULL``, one transaction per call).  After a crash the
journal then says whether the peer may be running the domain, and the
daemon asks it instead of guessing.

Phases only move forward; a call that would move one back (or touch a
finished migration) is a bug in the caller and raises RelocdError.
"""

from __future__ import annotations

import enum
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from relocd.engine.faults import crash_point
from relocd.errors import RelocdError

SCHEMA_VERSION = 3  # 3: the history table
#: Columns added after schema 1 (ALTER TABLE on an older journal), with their SQL type.
_ADDED_COLUMNS = (
    ("transport", "TEXT NOT NULL DEFAULT 'plain'"),
    ("server_name", "TEXT"),
    ("peer_identity", "TEXT"),
)

#: How the source reached the target, so a restarted daemon dials the same way.
PLAIN = "plain"
TLS = "tls"

SOURCE = "source"
TARGET = "target"
ROLES = (SOURCE, TARGET)

#: Rows `relocd history` keeps (the oldest go first).
HISTORY_ROWS = 10_000

#: Seconds to wait for another connection's write lock before giving up.
LOCK_TIMEOUT_S = 5.0


class Phase(str, enum.Enum):
    # source
    STARTED = "started"
    RESERVED = "reserved"
    STREAMING = "streaming"
    STOPPED = "stopped"  # domain paused, last pages going out
    PREPARED = "prepared"  # source: target said PREPARED; target: domain built, waiting for GO
    GO_SENT = "go-sent"  # the target may be running it: never resume without asking
    DONE = "done"
    # target
    RECEIVING = "receiving"
    RESUMING = "resuming"  # GO received: renaming and resuming (journaled before either)
    STARTING = "starting"  # the resume call is next: from here the copy may have run
    RESUMED = "resumed"
    # both
    ABORTED = "aborted"

    def __str__(self) -> str:
        return self.value


#: Forward order of each role's phases; ABORTED is reachable from any phase
#: before the last one (the source may still roll back after GO if the target
#: reports that it could not resume).
PHASE_ORDER: dict[str, tuple[Phase, ...]] = {
    SOURCE: (
        Phase.STARTED,
        Phase.RESERVED,
        Phase.STREAMING,
        Phase.STOPPED,
        Phase.PREPARED,
        Phase.GO_SENT,
        Phase.DONE,
    ),
    TARGET: (Phase.RECEIVING, Phase.PREPARED, Phase.RESUMING, Phase.STARTING, Phase.RESUMED),
}


def _may_move(role: str, old: Phase, new: Phase) -> bool:
    order = PHASE_ORDER[role]
    if old == Phase.ABORTED:
        return new == Phase.ABORTED
    if new == Phase.ABORTED:
        return old != order[-1]
    return new in order and order.index(new) >= order.index(old)


@dataclass(frozen=True)
class JournalEntry:
    """One migration as the journal knows it; times are Unix seconds."""

    migration_id: str
    role: str
    domain: str
    uuid: str
    peer: str
    live: bool
    phase: Phase
    outcome: str | None
    error: str | None
    started_at: float
    updated_at: float
    finished_at: float | None
    #: source: how it dialled the target (PLAIN or TLS; peer holds host:port)
    transport: str = PLAIN
    #: source: the name the target's certificate must carry (TLS only)
    server_name: str | None = None
    #: target: the source's TLS certificate identity, if it showed one
    peer_identity: str | None = None

    @property
    def finished(self) -> bool:
        return self.finished_at is not None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS migrations (
    migration_id TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    domain TEXT NOT NULL,
    uuid TEXT NOT NULL,
    peer TEXT NOT NULL,
    live INTEGER NOT NULL,
    phase TEXT NOT NULL,
    outcome TEXT,
    error TEXT,
    started_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS migrations_unfinished ON migrations (finished_at);
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    domain TEXT NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS history_domain ON history (domain, finished_at);
"""

_COLUMNS = (
    "migration_id, role, domain, uuid, peer, live, phase, outcome, error,"
    " started_at, updated_at, finished_at, transport, server_name, peer_identity"
)


def _entry(row: tuple[object, ...]) -> JournalEntry:
    (mid, role, domain, uuid, peer, live, phase, outcome, error, started, updated, finished,
     transport, server_name, peer_identity) = row  # fmt: skip
    return JournalEntry(
        migration_id=str(mid),
        role=str(role),
        domain=str(domain),
        uuid=str(uuid),
        peer=str(peer),
        live=bool(live),
        phase=Phase(phase),
        outcome=None if outcome is None else str(outcome),
        error=None if error is None else str(error),
        started_at=float(started),  # type: ignore[arg-type]
        updated_at=float(updated),  # type: ignore[arg-type]
        finished_at=None if finished is None else float(finished),  # type: ignore[arg-type]
        transport=str(transport),
        server_name=None if server_name is None else str(server_name),
        peer_identity=None if peer_identity is None else str(peer_identity),
    )


class Journal:
    """The migration journal in ``path`` (created if missing).

    Calls block for an fsync or two; asyncio callers may run them in a thread
    (one lock serialises them).
    """

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(
                str(path), timeout=LOCK_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        try:
            self._setup()
        except sqlite3.Error as exc:
            self._db.close()
            raise self._error(exc) from None
        except RelocdError:
            self._db.close()
            raise

    def _error(self, exc: sqlite3.Error) -> RelocdError:
        text = str(exc)
        if "locked" in text or "busy" in text:
            return RelocdError(
                f"journal {self.path} is locked by another process (another relocd on this state dir?)"
            )
        if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
            return RelocdError(
                f"journal {self.path} is corrupted ({text}); move it aside to start a new one"
            )
        return RelocdError(f"journal {self.path}: {text}")

    def _setup(self) -> None:
        db = self._db
        db.execute("PRAGMA journal_mode=WAL").fetchone()
        db.execute("PRAGMA synchronous=FULL")
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise RelocdError(
                f"journal {self.path} was written by a newer relocd (schema {version})"
            )
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise RelocdError(
                f"journal {self.path} is corrupted ({check}); move it aside to start a new one"
            )
        with self._transaction():
            db.executescript("BEGIN IMMEDIATE;" + _SCHEMA)
            have = {str(r[1]) for r in db.execute("PRAGMA table_info(migrations)").fetchall()}
            for column, sqltype in _ADDED_COLUMNS:
                if column not in have:  # a schema-1 journal: its rows were all plain TCP
                    db.execute(f"ALTER TABLE migrations ADD COLUMN {column} {sqltype}")
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One durable transaction (callers open it with BEGIN IMMEDIATE)."""
        with self._lock:
            try:
                yield self._db
                if self._db.in_transaction:
                    self._db.execute("COMMIT")
            except BaseException as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise self._error(exc) from None
                raise

    def _read(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        with self._lock:
            try:
                return list(self._db.execute(sql, args).fetchall())
            except sqlite3.Error as exc:
                raise self._error(exc) from None

    # -- writes ---------------------------------------------------------------

    def begin(
        self,
        migration_id: str,
        role: str,
        domain: str,
        uuid: str,
        peer: str,
        live: bool,
        *,
        transport: str = PLAIN,
        server_name: str | None = None,
        peer_identity: str | None = None,
    ) -> None:
        """Record a new migration in its role's first phase."""
        if transport not in (PLAIN, TLS):
            raise RelocdError(f"journal: unknown transport {transport!r}")
        if role not in ROLES:
            raise RelocdError(f"journal: unknown role {role!r}")
        now = self._clock()
        first = PHASE_ORDER[role][0]
        crash_point(role, "journal:begin")
        with self._transaction() as db:
            db.execute("BEGIN IMMEDIATE")
            if db.execute(
                "SELECT 1 FROM migrations WHERE migration_id = ?", (migration_id,)
            ).fetchone():
                raise RelocdError(f"journal: migration {migration_id} is already recorded")
            db.execute(
                f"INSERT INTO migrations ({_COLUMNS})"
                " VALUES (?,?,?,?,?,?,?,NULL,NULL,?,?,NULL,?,?,?)",
                (migration_id, role, domain, uuid, peer, int(live), first.value, now, now,
                 transport, server_name, peer_identity),  # fmt: skip
            )
        crash_point(role, "journal:begin:done")

    def set_phase(self, migration_id: str, phase: Phase) -> None:
        """Move a migration forward; on disk when this returns."""
        phase = Phase(phase)
        with self._transaction() as db:
            db.execute("BEGIN IMMEDIATE")
            entry = self._get_locked(migration_id)
            if entry.finished:
                raise RelocdError(
                    f"journal: migration {migration_id} is finished ({entry.outcome}); "
                    f"cannot move it to {phase}"
                )
            if not _may_move(entry.role, entry.phase, phase):
                raise RelocdError(
                    f"journal: {entry.role} migration {migration_id} cannot go "
                    f"from {entry.phase} to {phase}"
                )
            crash_point(entry.role, f"journal:{phase}")
            db.execute(
                "UPDATE migrations SET phase = ?, updated_at = ? WHERE migration_id = ?",
                (phase.value, self._clock(), migration_id),
            )
        crash_point(entry.role, f"journal:{phase}:done")

    def finish(self, migration_id: str, outcome: str, error: str | None = None) -> None:
        """Close a migration ("completed", "failed", "rolled-back"); once only."""
        with self._transaction() as db:
            db.execute("BEGIN IMMEDIATE")
            entry = self._get_locked(migration_id)
            if entry.finished:
                raise RelocdError(
                    f"journal: migration {migration_id} already finished ({entry.outcome})"
                )
            now = self._clock()
            crash_point(entry.role, f"journal:finish:{outcome}")
            db.execute(
                "UPDATE migrations SET outcome = ?, error = ?, updated_at = ?, finished_at = ?"
                " WHERE migration_id = ?",
                (outcome, error, now, now, migration_id),
            )
        crash_point(entry.role, f"journal:finish:{outcome}:done")

    def _get_locked(self, migration_id: str) -> JournalEntry:
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM migrations WHERE migration_id = ?", (migration_id,)
        ).fetchone()
        if row is None:
            raise RelocdError(f"journal: no migration {migration_id}")
        return _entry(row)

    # -- reads ----------------------------------------------------------------

    def get(self, migration_id: str) -> JournalEntry | None:
        rows = self._read(
            f"SELECT {_COLUMNS} FROM migrations WHERE migration_id = ?", (migration_id,)
        )
        return _entry(rows[0]) if rows else None

    def unfinished(self, role: str | None = None) -> list[JournalEntry]:
        """Migrations never finished (a daemon died in the middle), oldest first."""
        sql = f"SELECT {_COLUMNS} FROM migrations WHERE finished_at IS NULL"
        args: tuple[object, ...] = ()
        if role is not None:
            sql += " AND role = ?"
            args = (role,)
        return [_entry(r) for r in self._read(sql + " ORDER BY started_at, rowid", args)]

    def recent(self, limit: int = 50) -> list[JournalEntry]:
        """The last ``limit`` migrations, newest first."""
        rows = self._read(
            f"SELECT {_COLUMNS} FROM migrations ORDER BY started_at DESC, rowid DESC LIMIT ?",
            (limit,),
        )
        return [_entry(r) for r in rows]

    # -- history (relocd history) ---------------------------------------------------

    def add_history(self, kind: str, domain: str, started_at: float, finished_at: float,
                    record: dict[str, object]) -> None:  # fmt: skip
        """Keep what an operator asks `relocd history` about a finished migration, save or restore."""
        with self._transaction() as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute(
                "INSERT INTO history (kind, domain, started_at, finished_at, record) VALUES (?,?,?,?,?)",
                (kind, domain, started_at, finished_at, json.dumps(record, default=str)),
            )
            # Bounded: the oldest rows go past HISTORY_ROWS.
            db.execute(
                "DELETE FROM history WHERE id <= (SELECT MAX(id) FROM history) - ?", (HISTORY_ROWS,)
            )

    def history(self, domain: str | None = None, limit: int = 50) -> list[dict[str, object]]:
        """Finished migrations, saves and restores, newest first."""
        sql = "SELECT kind, domain, started_at, finished_at, record FROM history"
        args: tuple[object, ...] = ()
        if domain is not None:
            sql += " WHERE domain = ?"
            args = (domain,)
        rows = self._read(sql + " ORDER BY finished_at DESC, id DESC LIMIT ?", (*args, limit))
        out = []
        for kind, dom, started, finished, record in rows:
            try:
                fields = json.loads(str(record))
            except ValueError:
                fields = {}
            out.append({**fields, "kind": kind, "domain": dom, "started_at": started, "finished_at": finished})
        return out

    def close(self) -> None:
        with self._lock:
            self._db.close()
