"""Job store fixtures for both databases: `store` (each test runs on SQLite and on PostgreSQL) and
`second`, another replica's store on the same database (the same store on SQLite, which one
process owns)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from o2u_server.jobs.store import JobStore
from tests.server_testing import sqlite_integrity
from tests.webhook_receiver import receiver  # noqa: F401  (a fixture for the webhook tests)


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str | Path:
    """Where a test's store lives: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return tmp_path / "jobs.sqlite3"
    url: str = request.getfixturevalue("postgres").new_database()
    return url


@pytest.fixture
def store(database: str | Path) -> Iterator[JobStore]:
    opened = JobStore(database)
    opened.open()
    yield opened
    opened.close()
    if isinstance(database, Path):
        assert sqlite_integrity(database) == "ok"


@pytest.fixture
def second(database: str | Path, store: JobStore) -> Iterator[JobStore]:
    if isinstance(database, Path):
        yield store
        return
    opened = JobStore(database)
    opened.open()
    yield opened
    opened.close()
