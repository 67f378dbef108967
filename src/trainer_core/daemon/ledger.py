"""The job ledger: every file ever seen and every attempt, in SQLite (WAL mode).

The ledger, not the folders, is the source of truth: a state change is committed here first,
then the file is moved to the folder of its state (and a restart finishes any move a kill
interrupted, see ``service.Daemon.reconcile``). WAL lets the CLI read and submit while the
daemon writes; ``synchronous=FULL`` makes each commit durable before the daemon acts on it.

States of a file: ``incoming`` (being copied in), ``queued``, ``training``, ``completed``,
``failed``, ``skipped``.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from trainer_core.errors import UserError

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,            -- as the user knows it: path under inbox/, or submitted name
    fname TEXT,                    -- stored name, <id>-<basename>, in the folder of its state
    source TEXT,                   -- where it came from (inbox path or submitted path)
    origin TEXT NOT NULL,          -- inbox | submit
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    priority INTEGER NOT NULL,     -- 2 high, 1 normal, 0 low, < 0 retried
    seq INTEGER NOT NULL,          -- order within a priority (requeue = new seq)
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    forced INTEGER NOT NULL DEFAULT 0,
    duplicate_of INTEGER,
    rows INTEGER, invalid_rows INTEGER,
    steps INTEGER, tokens INTEGER,
    step_before INTEGER, step_after INTEGER,
    loss_start REAL, loss_end REAL,
    checkpoint TEXT,
    error TEXT,
    -- submitted_at: registered (ready); started_at: taken from the queue; train_started_at:
    -- validated and preprocessed, first step next; trained_at: last step and checkpoint done;
    -- finished_at: committed, reported and moved
    submitted_at REAL NOT NULL, started_at REAL, train_started_at REAL, trained_at REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS files_state ON files(state, priority, seq);
CREATE INDEX IF NOT EXISTS files_sha ON files(sha256);
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    file_id INTEGER NOT NULL REFERENCES files(id),
    attempt INTEGER NOT NULL,
    outcome TEXT NOT NULL,         -- completed | failed | skipped
    step_before INTEGER, step_after INTEGER,
    steps INTEGER, tokens INTEGER, loss_start REAL, loss_end REAL,
    error TEXT, started_at REAL, finished_at REAL
);
CREATE TABLE IF NOT EXISTS commands (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    cmd TEXT NOT NULL, arg TEXT, created_at REAL NOT NULL, done_at REAL, result TEXT
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""

FILE_COLUMNS = ("id", "name", "fname", "source", "origin", "sha256", "size", "priority", "seq",
                "state", "attempts", "forced", "duplicate_of", "rows", "invalid_rows", "steps",
                "tokens", "step_before", "step_after", "loss_start", "loss_end", "checkpoint",
                "error", "submitted_at", "started_at", "train_started_at", "trained_at",
                "finished_at")
#: States whose content counts for duplicate detection (a failed file may come again).
LIVE_STATES = ("incoming", "queued", "training", "completed")


#: Longest stored name, in bytes: with what the daemon writes around it (``.<name>.report.json
#: .tmp`` is 17 more) a file name stays within the 255 bytes Linux file systems allow.
MAX_STORED_NAME = 230


def stored_name(fid: int, name: str) -> str:
    """``<id>-<basename>``, the basename shortened (its suffix kept) so that every file the
    daemon writes next to it has a legal name: a 240-byte inbox name must not stop it."""
    base = Path(name).name
    prefix = f"{fid:06d}-"
    limit = MAX_STORED_NAME - len(prefix)
    raw = base.encode("utf-8", "surrogateescape")
    if len(raw) <= limit:
        return prefix + base
    suffix = Path(base).suffix if len(Path(base).suffix) <= 16 else ""
    keep = raw[:limit - len(suffix.encode("utf-8", "surrogateescape"))]
    return prefix + keep.decode("utf-8", "ignore") + suffix


class DiskFull(UserError):
    """The disk is full (a ledger write, a checkpoint, a copy): the daemon waits for space;
    a command says so in one line."""


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC however it surfaces: an OSError, SQLite's "database or disk is full", torch's
    "file write failed" (its stream writer hides the errno)."""
    if isinstance(exc, DiskFull) or getattr(exc, "errno", None) == 28:  # ENOSPC
        return True
    text = str(exc).lower()
    return "disk is full" in text or "no space left" in text or "file write failed" in text


def ledger_error(path: Path, exc: BaseException) -> str:
    """One line for a ledger that cannot be read or written."""
    if is_disk_full(exc):
        return f"{path}: the disk is full; free space, then start the daemon again"
    return (f"{path}: not a readable ledger ({exc}); restore ledger.sqlite from a backup, "
            "or move the home aside and start a new one")


class Ledger:
    """A connection to ``ledger.sqlite``; every method is one transaction."""

    def __init__(self, path: Path):
        self.path = path
        self.db = sqlite3.connect(str(path), timeout=30.0, isolation_level=None)
        try:
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA busy_timeout=30000")
            self.db.executescript(SCHEMA)
            self.db.execute("SELECT COUNT(*) FROM files").fetchone()  # a damaged file fails here
        except sqlite3.DatabaseError as exc:  # truncated or not SQLite; a full disk
            self.db.close()
            raise (DiskFull if is_disk_full(exc) else UserError)(ledger_error(path, exc)
                                                                 ) from None

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (``BEGIN IMMEDIATE``: writers queue up instead of deadlocking)."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as exc:
            if is_disk_full(exc):
                raise DiskFull(ledger_error(self.path, exc)) from None
            raise

    # ------------------------------------------------------------------ meta

    def meta(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, db: sqlite3.Connection, key: str, value: Any) -> None:
        db.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET "
                   "value=excluded.value", (key, None if value is None else str(value)))

    def put_meta(self, key: str, value: Any) -> None:
        with self.tx() as db:
            self.set_meta(db, key, value)

    def model_step(self) -> int:
        return int(self.meta("model_step", "0") or 0)

    # ------------------------------------------------------------------ files

    def next_seq(self, db: sqlite3.Connection) -> int:
        row = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM files").fetchone()
        return int(row[0])

    def add_file(self, name: str, source: str, origin: str, sha256: str, size: int,
                 priority: int, forced: bool = False, state: str = "incoming",
                 duplicate_of: int | None = None, error: str | None = None) -> dict[str, Any]:
        """Insert a file (``incoming`` until its copy is in place); returns its row."""
        with self.tx() as db:
            cur = db.execute(
                "INSERT INTO files(name, source, origin, sha256, size, priority, seq, state, "
                "forced, duplicate_of, error, submitted_at) VALUES(?,?,?,?,?,?,?,?,?,?,?,?)",
                (name, source, origin, sha256, size, priority, self.next_seq(db), state,
                 int(forced), duplicate_of, error, time.time()))
            fid = int(cur.lastrowid or 0)
            fname = stored_name(fid, name)
            db.execute("UPDATE files SET fname=? WHERE id=?", (fname, fid))
        return self.file(fid)

    def file(self, fid: int) -> dict[str, Any]:
        row = self.db.execute("SELECT * FROM files WHERE id=?", (fid,)).fetchone()
        if row is None:
            raise KeyError(fid)
        return dict(row)

    def files(self, where: str = "1", args: tuple = (), order: str = "id") -> list[dict[str, Any]]:
        rows = self.db.execute(f"SELECT * FROM files WHERE {where} ORDER BY {order}", args)
        return [dict(r) for r in rows]

    def find_duplicate(self, sha256: str) -> dict[str, Any] | None:
        marks = ",".join("?" * len(LIVE_STATES))
        rows = self.files(f"sha256=? AND state IN ({marks})", (sha256, *LIVE_STATES))
        return rows[0] if rows else None

    def queued(self) -> list[dict[str, Any]]:
        """Waiting files, in the order they will train."""
        return self.files("state='queued'", order="priority DESC, seq ASC")

    def training(self) -> dict[str, Any] | None:
        rows = self.files("state='training'")
        return rows[0] if rows else None

    def update(self, db: sqlite3.Connection, fid: int, **fields: Any) -> None:
        cols = ", ".join(f"{k}=?" for k in fields)
        db.execute(f"UPDATE files SET {cols} WHERE id=?", (*fields.values(), fid))

    def set_file(self, fid: int, **fields: Any) -> None:
        with self.tx() as db:
            self.update(db, fid, **fields)

    def add_attempt(self, db: sqlite3.Connection, **fields: Any) -> None:
        cols = ", ".join(fields)
        db.execute(f"INSERT INTO attempts({cols}) VALUES({','.join('?' * len(fields))})",
                   tuple(fields.values()))

    def attempts(self, limit: int | None = None) -> list[dict[str, Any]]:
        sql = ("SELECT a.*, f.name AS name FROM attempts a JOIN files f ON f.id=a.file_id "
               "ORDER BY a.id DESC")
        if limit:
            sql += f" LIMIT {int(limit)}"
        return [dict(r) for r in self.db.execute(sql)]

    def counts(self) -> dict[str, int]:
        rows = self.db.execute("SELECT state, COUNT(*) FROM files GROUP BY state")
        return {r[0]: int(r[1]) for r in rows}

    # ------------------------------------------------------------------ commands

    def add_command(self, cmd: str, arg: str | None = None) -> int:
        with self.tx() as db:
            cur = db.execute("INSERT INTO commands(cmd, arg, created_at) VALUES(?,?,?)",
                             (cmd, arg, time.time()))
            return int(cur.lastrowid or 0)

    def pending_commands(self) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM commands WHERE done_at IS NULL ORDER BY id")
        return [dict(r) for r in rows]

    def finish_command(self, cid: int, result: str) -> None:
        with self.tx() as db:
            db.execute("UPDATE commands SET done_at=?, result=? WHERE id=?",
                       (time.time(), result, cid))

    def command(self, cid: int) -> dict[str, Any]:
        return dict(self.db.execute("SELECT * FROM commands WHERE id=?", (cid,)).fetchone())
