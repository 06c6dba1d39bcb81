"""A real PostgreSQL server for tests: a throwaway cluster from Debian's `postgresql` package.

Usage, as a context manager::

    from tests.postgres_server import running_postgres

    with running_postgres() as postgres:
        url = postgres.new_database()              # postgresql://postgres@127.0.0.1:PORT/test_...
        postgres.restart()                         # a database restart, connections cut
        postgres.sql("SELECT count(*) FROM jobs", database=url)

or through the `postgres` fixture of tests/o2u_server/conftest.py, which skips the tests that need it
when the server binaries are missing (`require_postgres` says why), except under CI=true, where a
missing PostgreSQL fails them: CI installs it (.ci/run).

PostgreSQL refuses to run as root, so as root the cluster runs as the `postgres` user, in a folder
under the system's temporary directory (that user cannot enter a checkout under /root). The cluster
listens on a free loopback port with trust authentication and without fsync: it lives for one test
session and holds nothing worth keeping.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

__all__ = ["PostgresServer", "postgres_binaries", "require_postgres", "running_postgres"]

_SEARCHED = [Path(f"/usr/lib/postgresql/{version}/bin") for version in (17, 16, 15, 14)]


def postgres_binaries() -> Path | None:
    """The folder of initdb and pg_ctl (Debian's layout, or on PATH), None when not installed."""
    for folder in _SEARCHED:
        if (folder / "pg_ctl").exists():
            return folder
    found = shutil.which("pg_ctl")
    return Path(found).parent if found else None


def require_postgres() -> Path:
    """The binaries' folder; skips the calling test without them, or fails it under CI=true."""
    import pytest

    folder = postgres_binaries()
    if folder is None:
        reason = "PostgreSQL server binaries (Debian package postgresql) are not installed"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; .ci/run installs them")
        pytest.skip(reason)
    return folder


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class PostgresServer:
    """A cluster in `directory`, served on 127.0.0.1:`port` while started."""

    binaries: Path
    directory: Path
    port: int
    settings: tuple[str, ...] = ()  # extra `-c name=value` server settings

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        return subprocess.run(
            [*prefix, *args],
            check=check,
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )

    def _pg_ctl(self, action: str, *extra: str) -> None:
        options = (
            f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c max_connections=300 -c full_page_writes=off"
        ) + "".join(f" -c {setting}" for setting in self.settings)
        result = self._run(
            str(self.binaries / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.directory / "server.log"),
            "-w",
            "-t",
            "60",
            "-o",
            options,
            action,
            *extra,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctl {action} failed:\n{result.stdout}{result.stderr}\n{self.log_tail()}")

    def init(self) -> None:
        self._run(
            str(self.binaries / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync"
        )

    def start(self) -> None:
        self._pg_ctl("start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; `fast` rolls back open transactions and cuts every connection."""
        self._pg_ctl("stop", "-m", mode)

    def restart(self) -> None:
        self._pg_ctl("restart", "-m", "fast")

    def sql(self, statement: str, *params: Any, database: str | None = None) -> list[tuple[Any, ...]]:
        """Run one statement (autocommit) and return its rows (none for statements without)."""
        with psycopg.connect(database or self.url, autocommit=True, connect_timeout=10) as conn:
            cursor = conn.execute(statement, params or None)
            return cursor.fetchall() if cursor.description else []

    def new_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        name = f"test_{uuid.uuid4().hex[:12]}"
        self.sql(f"CREATE DATABASE {name}")
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def log_tail(self, limit: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return (self.directory / "server.log").read_text(errors="replace")[-limit:]
        return ""


@contextlib.contextmanager
def running_postgres(
    binaries: Path | None = None, *, settings: tuple[str, ...] = ()
) -> Iterator[PostgresServer]:
    """initdb a cluster in a temporary folder, start it on a free port (with the extra `name=value`
    server `settings`), yield it, remove it."""
    folder = binaries or postgres_binaries()
    if folder is None:
        raise RuntimeError("PostgreSQL server binaries are not installed (Debian package postgresql)")
    directory = Path(tempfile.mkdtemp(prefix="o2u-postgres-", dir="/tmp"))
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres", "postgres")
    server = PostgresServer(folder, directory, _free_port(), settings)
    try:
        server.init()
        server.start()
        yield server
    finally:
        with contextlib.suppress(RuntimeError, subprocess.SubprocessError):
            server.stop("immediate")
        shutil.rmtree(directory, ignore_errors=True)
