"""The SQLite record of every teacher request and response, so data generation resumes.

One row per request, keyed by (image id, response type, prompt hash, teacher). The prompt
hash covers the exact messages sent, so a changed prompt, seed example or context is a new
request while an unchanged one is answered from the store and never sent again.

Row status:
- `pending`: the request is stored and may be in flight (a killed run leaves these; they
  are sent again on resume, since no answer was kept);
- `done`: the answer parsed; `sample` holds the LLaVA JSON sample;
- `rejected`: the answer arrived but failed validation; `reason` and the raw `response`
  are kept for inspection and the request is not sent again (but for a reply cut at a
  token limit, `max_tokens` in `request`, which a run allowing more sends again);
- `failed`: the endpoint kept failing; sent again on the next run.

The database runs in WAL mode with `synchronous=NORMAL`: each answer is committed as soon
as it arrives, and a `kill -9` loses at most the requests then in flight. The store is
written from one thread (the pipeline's main thread); reads and writes are also guarded by
a lock so a stray call from another thread cannot corrupt it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vistune.errors import DataError

STATUSES = ("pending", "done", "rejected", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    image_id    TEXT NOT NULL,
    type        TEXT NOT NULL,
    prompt_hash TEXT NOT NULL,
    teacher     TEXT NOT NULL,
    status      TEXT NOT NULL,
    request     TEXT NOT NULL,
    response    TEXT,
    sample      TEXT,
    reason      TEXT,
    attempts    INTEGER NOT NULL DEFAULT 0,
    updated     REAL NOT NULL,
    PRIMARY KEY (image_id, type, prompt_hash, teacher)
);
CREATE TABLE IF NOT EXISTS runs (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    started  REAL NOT NULL,
    finished REAL,
    settings TEXT NOT NULL,
    summary  TEXT
);
"""


def prompt_hash(messages: list[dict]) -> str:
    """16 hex digits of SHA-256 over the messages as canonical JSON."""
    text = json.dumps(messages, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class Key:
    image_id: str
    type: str
    prompt_hash: str
    teacher: str


@dataclass(frozen=True)
class Record:
    key: Key
    status: str
    request: dict[str, Any]
    response: str | None
    sample: dict[str, Any] | None
    reason: str | None
    attempts: int


_CAUSES = {
    "SQLITE_BUSY": "it is locked by another process (another datagen run on the same --db, or"
    " an open sqlite3 session?); wait for it to finish, or give another --db",
    "SQLITE_LOCKED": "it is locked by another connection; wait for it, or give another --db",
    "SQLITE_READONLY": "it is read-only (the file, its folder or its -wal/-shm files cannot be"
    " written); make them writable, or give another --db",
    "SQLITE_CANTOPEN": "the file cannot be opened (a folder of that name, or a folder that"
    " cannot be written?)",
    "SQLITE_FULL": "the disk is full",
    "SQLITE_IOERR": "a disk input/output error",
    "SQLITE_CORRUPT": "the database is damaged",
}
"""SQLite's error name -> what it means for the user; the error text follows in brackets."""

_COLUMNS = {
    "requests": {"image_id", "type", "prompt_hash", "teacher", "status", "request",
                 "response", "sample", "reason", "attempts", "updated"},
    "runs": {"id", "started", "finished", "settings", "summary"},
}  # fmt: skip


class Store:
    """Requests and answers in one SQLite file (created with its folder when missing).

    Every failure of the database (locked by another process for longer than
    `busy_timeout` seconds, read-only, a full disk, not a store) is one DataError naming
    the file and the cause; what was committed before stays in the file."""

    def __init__(self, path: str | Path, busy_timeout: float = 10.0) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DataError(f"{self.path}: cannot create its folder ({err})") from None
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(
                self.path, timeout=busy_timeout, check_same_thread=False, isolation_level=None
            )
        except sqlite3.Error as err:
            raise DataError(f"{self.path}: cannot open the request store: {_cause(err)}") from None
        try:
            with self._sql("open"):
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.executescript(_SCHEMA)
                self._check_columns()
        except DataError:
            self._db.close()
            raise

    def _check_columns(self) -> None:
        for table, expected in _COLUMNS.items():
            found = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            if not expected <= found:
                raise DataError(
                    f"{self.path}: not a vistune request store (table {table} lacks "
                    f"{', '.join(sorted(expected - found))})"
                )

    @contextlib.contextmanager
    def _sql(self, doing: str) -> Iterator[None]:
        """Turn a database failure into one DataError saying what was being done and why."""
        try:
            yield
        except sqlite3.Error as err:
            if getattr(err, "sqlite_errorname", "") == "SQLITE_NOTADB":
                raise DataError(f"{self.path}: not a vistune request store ({err})") from None
            raise DataError(
                f"{self.path}: cannot {doing} the request store: {_cause(err)}"
            ) from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, key: Key) -> Record | None:
        with self._lock, self._sql("read"):
            row = self._db.execute(
                "SELECT status, request, response, sample, reason, attempts FROM requests "
                "WHERE image_id=? AND type=? AND prompt_hash=? AND teacher=?",
                (key.image_id, key.type, key.prompt_hash, key.teacher),
            ).fetchone()
        if row is None:
            return None
        status, request, response, sample, reason, attempts = row
        return Record(
            key=key,
            status=status,
            request=json.loads(request),
            response=response,
            sample=json.loads(sample) if sample else None,
            reason=reason,
            attempts=attempts,
        )

    def begin(self, key: Key, request: dict[str, Any]) -> None:
        """Record a request about to be sent (status pending, one more attempt)."""
        with self._lock, self._sql("write"):
            self._db.execute(
                "INSERT INTO requests (image_id, type, prompt_hash, teacher, status, request,"
                " attempts, updated) VALUES (?, ?, ?, ?, 'pending', ?, 1, ?) "
                "ON CONFLICT (image_id, type, prompt_hash, teacher) DO UPDATE SET "
                "status='pending', request=excluded.request, attempts=attempts+1,"
                " updated=excluded.updated",
                (*_tuple(key), json.dumps(request, ensure_ascii=False), time.time()),
            )

    def finish(
        self,
        key: Key,
        status: str,
        response: str | None = None,
        sample: dict[str, Any] | None = None,
        reason: str | None = None,
    ) -> None:
        """Record the outcome of a request begun with `begin`; committed at once."""
        if status not in STATUSES[1:]:
            raise ValueError(f"unknown final status {status!r}; valid: {', '.join(STATUSES[1:])}")
        with self._lock, self._sql("write"):
            cursor = self._db.execute(
                "UPDATE requests SET status=?, response=?, sample=?, reason=?, updated=? "
                "WHERE image_id=? AND type=? AND prompt_hash=? AND teacher=?",
                (
                    status,
                    response,
                    json.dumps(sample, ensure_ascii=False) if sample is not None else None,
                    reason,
                    time.time(),
                    *_tuple(key),
                ),
            )
        if cursor.rowcount != 1:
            raise KeyError(f"no request recorded for {key}")

    def counts(self) -> dict[str, int]:
        """Rows per status over the whole store."""
        with self._lock, self._sql("read"):
            rows = self._db.execute("SELECT status, COUNT(*) FROM requests GROUP BY status")
            return {status: n for status, n in rows}

    def start_run(self, settings: dict[str, Any]) -> int:
        with self._lock, self._sql("write"):
            cursor = self._db.execute(
                "INSERT INTO runs (started, settings) VALUES (?, ?)",
                (time.time(), json.dumps(settings, sort_keys=True, default=str)),
            )
            return int(cursor.lastrowid)

    def finish_run(self, run_id: int, summary: dict[str, Any]) -> None:
        with self._lock, self._sql("write"):
            self._db.execute(
                "UPDATE runs SET finished=?, summary=? WHERE id=?",
                (time.time(), json.dumps(summary, sort_keys=True), run_id),
            )


def _cause(err: sqlite3.Error) -> str:
    name = getattr(err, "sqlite_errorname", "")
    known = next((text for prefix, text in _CAUSES.items() if name.startswith(prefix)), None)
    return f"{known} ({err})" if known else str(err)


def _tuple(key: Key) -> tuple[str, str, str, str]:
    return (key.image_id, key.type, key.prompt_hash, key.teacher)
