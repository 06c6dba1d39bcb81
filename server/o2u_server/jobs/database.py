"""The SQLite database under the job store: schema, per-thread connections and write transactions.

SQLite runs in WAL mode so readers (RPC handlers) never wait for the writer (a training worker
storing a million scores). Each thread gets its own connection; writes are serialized by one lock and
`BEGIN IMMEDIATE`, and a write that must survive power loss (a newly accepted job, a final state)
commits with `synchronous=FULL`. An exclusive lock file stops a second server from opening the same
state directory, which SQLite alone would allow but the job runner cannot share. A write that fails
because the volume is full raises StateStoreFull (RESOURCE_EXHAUSTED), and the connection stays
usable, so the store works again as soon as space is freed; reads keep working meanwhile.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from o2u_server.errors import StateStoreFull

__all__ = ["Database", "StateDirLockedError"]

_SQLITE_FULL = 13  # result code of a write that found the disk (or quota) full

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL UNIQUE,
    request_id TEXT UNIQUE,
    request_hash TEXT NOT NULL,
    display_name TEXT NOT NULL,
    dataset_uri TEXT NOT NULL,
    dataset_format TEXT,
    config_json TEXT NOT NULL,
    initial_weights_uri TEXT,
    state TEXT NOT NULL,
    progress_json TEXT,
    error_json TEXT,
    run_info_json TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    crashes INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    last_sequence INTEGER NOT NULL DEFAULT 0,
    create_time REAL NOT NULL,
    update_time REAL NOT NULL,
    start_time REAL,
    end_time REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, seq);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    event_time REAL NOT NULL,
    type TEXT NOT NULL,
    state TEXT NOT NULL,
    progress_json TEXT,
    error_json TEXT,
    message TEXT NOT NULL,
    PRIMARY KEY (job_id, sequence)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS scores (
    job_id TEXT NOT NULL,
    rank INTEGER NOT NULL,
    sample_id INTEGER NOT NULL,
    key TEXT NOT NULL,
    given_label INTEGER NOT NULL,
    score REAL NOT NULL,
    score_variance REAL NOT NULL,
    noise_probability REAL NOT NULL,
    suspected INTEGER NOT NULL,
    suggested_label INTEGER NOT NULL,
    suggested_label_confidence REAL NOT NULL,
    PRIMARY KEY (job_id, rank)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS class_names (
    job_id TEXT NOT NULL,
    label INTEGER NOT NULL,
    name TEXT NOT NULL,
    PRIMARY KEY (job_id, label)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS summaries (
    job_id TEXT PRIMARY KEY,
    summary_json TEXT NOT NULL
);
"""


class StateDirLockedError(RuntimeError):
    """Another server process holds the state directory."""


class Database:
    """One SQLite file, opened by `open()` and released by `close()`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._lock_fd: int | None = None
        self._closed = True

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateDirLockedError(
                f"another o2u-server is using the state directory {str(self.path.parent)!r}; "
                "each server needs its own O2U_STATE_DIR"
            ) from None
        self._lock_fd = fd
        self._closed = False
        conn = self.connection()
        conn.execute("PRAGMA journal_mode=WAL")
        with self.write(durable=True) as transaction:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    transaction.execute(statement)
            transaction.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
            transaction.execute(
                "INSERT OR IGNORE INTO meta VALUES ('page_token_secret', ?)", (secrets.token_bytes(32),)
            )

    def close(self) -> None:
        """Close every connection and release the state directory."""
        self._closed = True
        with self._connections_lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def connection(self) -> sqlite3.Connection:
        """This thread's connection (autocommit; transactions are explicit)."""
        if self._closed:
            raise RuntimeError("the job store is closed")
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            # check_same_thread=False only so close() can close it from another thread.
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
            with self._connections_lock:
                self._connections.append(conn)
        return conn

    @contextmanager
    def write(self, *, durable: bool = False) -> Iterator[sqlite3.Connection]:
        """One write transaction; `durable` fsyncs the WAL at commit."""
        conn = self.connection()
        with self._write_lock:
            try:
                if durable:
                    conn.execute("PRAGMA synchronous=FULL")
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:  # SQLite may have rolled back by itself (e.g. disk full)
                        conn.execute("ROLLBACK")
                    raise
                finally:
                    if durable:
                        conn.execute("PRAGMA synchronous=NORMAL")
            except sqlite3.OperationalError as error:
                if getattr(error, "sqlite_errorcode", 0) & 0xFF == _SQLITE_FULL:
                    raise StateStoreFull() from error
                raise

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot across several SELECTs."""
        conn = self.connection()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    def meta(self, key: str) -> bytes:
        row = self.connection().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise KeyError(key)
        value = row[0]
        return value if isinstance(value, bytes) else str(value).encode()
