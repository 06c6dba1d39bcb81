"""The database under the job store: SQLite (embedded, one process) or PostgreSQL (many replicas).

`Database` opens a SQLAlchemy engine for the URL, migrates the schema (`migrate`) and hands out
transactions. SQLite runs in WAL mode so readers never wait for the writer; writes are serialized
by one lock and `BEGIN IMMEDIATE`, a write that must survive power loss commits with
`synchronous=FULL`, and an exclusive lock file keeps a second server off the same state directory.
PostgreSQL commits durably anyway; replicas migrate one at a time under an advisory lock, reads that
span several SELECTs see one snapshot (REPEATABLE READ), and a lost connection (a database restart
or fail-over) is retried for up to `retry_seconds` before a call answers UNAVAILABLE
(DATABASE_UNAVAILABLE, with RetryInfo). A write that finds no room - SQLite's volume full, or a
PostgreSQL server out of disk (SQLSTATE 53100) - raises StateStoreFull (RESOURCE_EXHAUSTED with
RetryInfo: STATE_DISK_FULL or DATABASE_FULL) at once instead of being retried here; the transaction
is rolled back, the connection stays usable, reads keep working, and the same write succeeds again
as soon as space is freed (`jobs.state_volume` retries the runner's writes).
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import URL, ColumnElement, Connection, Double, Engine, cast, create_engine, event, func
from sqlalchemy import select as sql_select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from o2u_server.errors import StateStoreFull, Unavailable
from o2u_server.jobs import migrate
from o2u_server.jobs.tables import meta
from o2u_server.settings import Settings

__all__ = ["Database", "StateDirLockedError", "database_url"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
# pg_advisory_lock keys: the schema migration at start-up, and job admission (the queue limit).
MIGRATION_LOCK = 0x6F32_7501
ADMISSION_LOCK = 0x6F32_7502
_SQLITE_FULL = 13  # SQLite's result code of a write that found the disk (or quota) full
_POSTGRESQL_DISK_FULL = "53100"  # SQLSTATE disk_full
# The LISTEN/NOTIFY channel that carries "event <job> <sequence>", "cancel <job>" and "queued <job>".
NOTIFY_CHANNEL = "o2u_jobs"


class StateDirLockedError(RuntimeError):
    """Another server process holds the state directory."""


def database_url(settings: Settings) -> URL:
    """The store's URL: O2U_DATABASE_URL (its password from database_password_file when set), or
    SQLite in the state directory. `postgresql://` uses the psycopg driver."""
    if settings.database_url is None:
        return URL.create("sqlite", database=str(settings.store_path))
    url = make_url(settings.database_url.get_secret_value())
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    if settings.database_password_file is not None:
        url = url.set(password=settings.database_password_file.read_text().strip())
    return url


def _transient(error: DBAPIError) -> bool:
    return error.connection_invalidated or isinstance(error, OperationalError | InterfaceError)


def _disk_full(error: BaseException) -> bool:
    # A driver's own error where SQLAlchemy does not wrap it (COPY runs on psycopg's connection).
    original = error.orig if isinstance(error, DBAPIError) else error
    if getattr(original, "sqlstate", None) == _POSTGRESQL_DISK_FULL:
        return True
    return int(getattr(original, "sqlite_errorcode", 0)) & 0xFF == _SQLITE_FULL


class Database:
    """One database, opened by `open()` and released by `close()`."""

    def __init__(self, url: URL | str | Path, *, retry_seconds: float = 30.0) -> None:
        """`retry_seconds` also bounds how long a transaction may sit idle on PostgreSQL: a replica
        paused inside one (SIGSTOP, a frozen VM) would otherwise hold its row locks for good."""
        self.url = URL.create("sqlite", database=str(url)) if isinstance(url, Path) else make_url(url)
        self.dialect = "sqlite" if self.url.get_backend_name() == "sqlite" else "postgresql"
        self.retry_seconds = retry_seconds
        self._engine: Engine | None = None
        self._write_lock = threading.Lock()  # SQLite: one writer at a time in this process
        self._lock_fd: int | None = None

    @property
    def postgresql(self) -> bool:
        return self.dialect == "postgresql"

    @property
    def description(self) -> str:
        """The URL without its password, for logs and errors."""
        return self.url.render_as_string(hide_password=True)

    # -- lifecycle ---------------------------------------------------------------------------------

    def open(self) -> None:
        """Connect, migrate the schema to the newest revision and make sure the store has its secret."""
        if self.postgresql:
            idle_ms = max(1000, int(self.retry_seconds * 1000))
            engine = create_engine(
                self.url,
                pool_size=10,
                max_overflow=20,
                # No pre-ping (a round trip per transaction): a connection that died with a database
                # restart fails its first statement, which invalidates the pool and is retried.
                connect_args={
                    "connect_timeout": 5,
                    "application_name": "o2u-server",
                    "options": f"-c idle_in_transaction_session_timeout={idle_ms}",
                },
            )
        else:
            self._lock_state_dir()
            engine = create_engine(self.url, pool_size=16, max_overflow=16)
            event.listen(engine, "connect", _sqlite_connect)
            event.listen(engine, "begin", _sqlite_begin)
        self._engine = engine
        self.retry(self._migrate)

    def _lock_state_dir(self) -> None:
        path = Path(self.url.database or "")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateDirLockedError(
                f"another o2u-server is using the state directory {str(path.parent)!r}; "
                "each server needs its own O2U_STATE_DIR"
            ) from None
        self._lock_fd = fd

    def _migrate(self) -> None:
        with self.engine.connect() as conn:
            if self.postgresql:  # replicas starting together migrate one after the other
                conn.exec_driver_sql(f"SELECT pg_advisory_lock({MIGRATION_LOCK})")
                conn.commit()
            try:
                migrate.upgrade(conn)
                with conn.begin():
                    found = conn.execute(sql_select(meta.c.key).where(meta.c.key == "page_token_secret"))
                    if found.first() is None:
                        conn.execute(
                            meta.insert().values(key="page_token_secret", value=secrets.token_bytes(32))
                        )
            finally:
                if self.postgresql:
                    conn.exec_driver_sql(f"SELECT pg_advisory_unlock({MIGRATION_LOCK})")
                    conn.commit()

    def close(self) -> None:
        """Close every connection and release the state directory."""
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("the job store is closed")
        return self._engine

    # -- transactions ------------------------------------------------------------------------------

    @contextmanager
    def write(self, *, durable: bool = False) -> Iterator[Connection]:
        """One write transaction; `durable` (SQLite) fsyncs the WAL at commit. StateStoreFull if the
        database has no room for it (rolled back; see the module docstring)."""
        try:
            with self._transaction(durable) as conn:
                yield conn
        except Exception as error:
            if not _disk_full(error):
                raise
            logger.error("the job database %s is out of space: %s", self.description, error)
            if self.postgresql:
                raise StateStoreFull(
                    "the server's job database is out of disk space, so the server accepts no new jobs "
                    "until its operator frees space; retry later",
                    reason="DATABASE_FULL",
                ) from error
            raise StateStoreFull() from error

    @contextmanager
    def _transaction(self, durable: bool) -> Iterator[Connection]:
        if self.postgresql:
            with self.engine.begin() as conn:
                yield conn
            return
        with self._write_lock, self.engine.connect() as conn:
            driver = conn.connection.driver_connection  # PRAGMAs outside SQLAlchemy's transaction
            assert driver is not None
            if durable:
                driver.execute("PRAGMA synchronous=FULL")
            try:
                with conn.execution_options(o2u_begin="BEGIN IMMEDIATE").begin():
                    yield conn
            finally:
                if durable:
                    driver.execute("PRAGMA synchronous=NORMAL")

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A consistent snapshot across several SELECTs."""
        options: dict[str, Any] = {"isolation_level": "REPEATABLE READ"} if self.postgresql else {}
        with self.engine.connect() as conn, conn.execution_options(**options).begin():
            yield conn

    def retry(self, operation: Callable[[], T]) -> T:
        """Run `operation` (one or more whole transactions), again while the database is unreachable.

        Only PostgreSQL is retried: its connections break when the server restarts. After
        `retry_seconds` the call raises Unavailable."""
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.1
        while True:
            try:
                return operation()
            except DBAPIError as error:
                if not (self.postgresql and _transient(error)):
                    raise
                if time.monotonic() + delay > deadline:
                    raise Unavailable(
                        f"the job database {self.description} is unreachable "
                        f"({type(error.orig).__name__}); retry shortly",
                        reason="DATABASE_UNAVAILABLE",
                        retry_after_seconds=5.0,
                    ) from error
                logger.warning("database unreachable, retrying: %s", type(error.orig).__name__)
                time.sleep(delay)
                delay = min(2.0, delay * 2)

    # -- dialect differences -----------------------------------------------------------------------

    def clock(self) -> ColumnElement[float]:
        """The database's time in Unix seconds: leases compare against one clock, not each replica's."""
        if self.postgresql:
            return cast(func.extract("epoch", func.clock_timestamp()), Double)
        return cast((func.julianday("now") - 2440587.5) * 86400.0, Double)

    def notify(self, conn: Connection, message: str) -> None:
        """Wake the other replicas' listeners when this transaction commits (PostgreSQL only)."""
        if self.postgresql:
            conn.execute(sql_select(func.pg_notify(NOTIFY_CHANNEL, message)))

    def lock_admission(self, conn: Connection) -> None:
        """Serialize job admission across replicas until this transaction ends, so the queue limit
        holds (SQLite's BEGIN IMMEDIATE already serializes every writer)."""
        if self.postgresql:
            conn.execute(sql_select(func.pg_advisory_xact_lock(ADMISSION_LOCK)))


def _sqlite_connect(dbapi_connection: Any, _record: object) -> None:
    dbapi_connection.isolation_level = None  # SQLAlchemy's begin event issues BEGIN itself
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    conn.exec_driver_sql(conn.get_execution_options().get("o2u_begin", "BEGIN"))
