"""Schema migrations: a migrated database is exactly `jobs/tables.py` (on both databases), replicas
that start together migrate once, and a store written before migrations existed is upgraded in
place with its jobs."""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import Connection, create_engine, inspect, select

from o2u_server.domain import DatasetOptions, JobState, LabelStudioOptions, SkippedRecords
from o2u_server.jobs.migrate import SCRIPT_LOCATION, NewerSchemaError, head_revision
from o2u_server.jobs.store import JobStore
from o2u_server.jobs.tables import jobs, metadata
from tests.o2u_server.jobs.store_testing import INFO, SPEC, claim, job_id
from tests.postgres_server import PostgresServer
from tests.server_testing import sqlite_integrity

# The schema the store created before it had migrations (schema_version 1), verbatim.
_LEGACY_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL UNIQUE, request_id TEXT UNIQUE,
    request_hash TEXT NOT NULL, display_name TEXT NOT NULL, dataset_uri TEXT NOT NULL,
    dataset_format TEXT, config_json TEXT NOT NULL, initial_weights_uri TEXT, state TEXT NOT NULL,
    progress_json TEXT, error_json TEXT, run_info_json TEXT, attempts INTEGER NOT NULL DEFAULT 0,
    crashes INTEGER NOT NULL DEFAULT 0, cancel_requested INTEGER NOT NULL DEFAULT 0,
    last_sequence INTEGER NOT NULL DEFAULT 0, create_time REAL NOT NULL, update_time REAL NOT NULL,
    start_time REAL, end_time REAL
);
CREATE INDEX jobs_by_state ON jobs (state, seq);
CREATE TABLE events (
    job_id TEXT NOT NULL, sequence INTEGER NOT NULL, event_time REAL NOT NULL, type TEXT NOT NULL,
    state TEXT NOT NULL, progress_json TEXT, error_json TEXT, message TEXT NOT NULL,
    PRIMARY KEY (job_id, sequence)
) WITHOUT ROWID;
CREATE TABLE scores (
    job_id TEXT NOT NULL, rank INTEGER NOT NULL, sample_id INTEGER NOT NULL, key TEXT NOT NULL,
    given_label INTEGER NOT NULL, score REAL NOT NULL, score_variance REAL NOT NULL,
    noise_probability REAL NOT NULL, suspected INTEGER NOT NULL, suggested_label INTEGER NOT NULL,
    suggested_label_confidence REAL NOT NULL, PRIMARY KEY (job_id, rank)
) WITHOUT ROWID;
CREATE TABLE class_names (
    job_id TEXT NOT NULL, label INTEGER NOT NULL, name TEXT NOT NULL, PRIMARY KEY (job_id, label)
) WITHOUT ROWID;
CREATE TABLE summaries (job_id TEXT PRIMARY KEY, summary_json TEXT NOT NULL);
INSERT INTO meta VALUES ('schema_version', 1);
INSERT INTO meta VALUES ('page_token_secret',
    x'000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f');
INSERT INTO jobs (job_id, request_hash, display_name, dataset_uri, config_json, state, attempts,
    last_sequence, create_time, update_time)
VALUES ('job-00000000000000000000000000000001', 'h', 'old', 'file:///d/1.npz', '{}', 'running', 1, 2,
    1.0, 2.0);
INSERT INTO events VALUES ('job-00000000000000000000000000000001', 1, 1.0, 'state_changed', 'queued',
    NULL, NULL, 'job accepted');
INSERT INTO events VALUES ('job-00000000000000000000000000000001', 2, 2.0, 'state_changed', 'running',
    NULL, NULL, 'attempt 1 started');
"""


def test_the_migrated_schema_is_the_tables_module(database: str | Path, store: JobStore) -> None:
    url = f"sqlite:///{database}" if isinstance(database, Path) else database
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), metadata) == []
            version = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar_one()
            assert version == head_revision()
    finally:
        engine.dispose()


def test_replicas_starting_together_migrate_once(postgres: PostgresServer) -> None:
    url = postgres.new_database()
    stores = [JobStore(url) for _ in range(4)]
    barrier = threading.Barrier(len(stores))
    failures: list[BaseException] = []

    def start(store: JobStore) -> None:
        barrier.wait()
        try:
            store.open()
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=start, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert failures == []
        assert len({store.page_token_secret for store in stores}) == 1
        assert postgres.sql("SELECT count(*) FROM alembic_version", database=url) == [(1,)]
    finally:
        for store in stores:
            store.close()


def test_a_store_from_before_migrations_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    legacy = sqlite3.connect(path)
    legacy.executescript(_LEGACY_SCHEMA)
    legacy.close()

    store = JobStore(path)
    store.open()
    try:
        assert store.page_token_secret == bytes(range(32))
        recovery = store.claims.recover(3.0, max_attempts=3)  # the old process died with it running
        assert recovery.queued == [job_id(1)]
        lease, job, event = claim(store, now=4.0)
        assert (lease.attempt, job.state, event.sequence) == (2, JobState.RUNNING, 4)
        columns = {column["name"] for column in inspect(store.db.engine).get_columns("jobs")}
        assert {"lease_owner", "lease_expires_at", "dataset_options_json"} <= columns
    finally:
        store.close()
    assert sqlite_integrity(path) == "ok"


@contextlib.contextmanager
def _sqlite_at_revision(path: Path, revision: str) -> Iterator[Connection]:
    """A connection to a new SQLite store at `path`, migrated up to `revision` only (committed)."""
    engine = create_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            config = Config()
            config.set_main_option("script_location", str(SCRIPT_LOCATION))
            config.attributes["connection"] = conn
            command.upgrade(config, revision)
            conn.commit()
            yield conn
    finally:
        engine.dispose()


def test_revision_0006_adds_the_dataset_options_to_jobs_of_0005(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    with _sqlite_at_revision(path, "0005") as conn:
        before = {column["name"] for column in inspect(conn).get_columns("jobs")}
        assert "dataset_options_json" not in before
    store = JobStore(path)
    store.open()  # migrates 0005 -> head
    try:
        columns = {column["name"]: column for column in inspect(store.db.engine).get_columns("jobs")}
        assert columns["dataset_options_json"]["nullable"]
        store.create_job(job_id(1), SPEC, 1.0, max_queued=10)
        assert store.get_job(job_id(1)).spec.dataset_options is None, "no options: the defaults"
    finally:
        store.close()
    assert sqlite_integrity(path) == "ok"


def test_revision_0007_keeps_the_jobs_of_0006_and_never_reuses_a_deleted_job_s_seq(tmp_path: Path) -> None:
    """The table rebuilds before 0007 had dropped AUTOINCREMENT: the next job took the seq of a
    deleted newest one. After 0007 the jobs of 0006 keep their numbers and no number comes back."""
    path = tmp_path / "jobs.sqlite3"
    with _sqlite_at_revision(path, "0006") as conn:
        conn.exec_driver_sql(
            "INSERT INTO jobs (seq, job_id, request_hash, display_name, dataset_uri, config_json, state, "
            f"create_time, update_time) VALUES (7, '{job_id(7)}', 'h', 'old', 'file:///d/7.npz', '{{}}', "
            "'succeeded', 1.0, 2.0)"
        )
        conn.commit()
    store = JobStore(path)
    store.open()  # migrates 0006 -> head
    try:
        assert store.get_job(job_id(7)).state is JobState.SUCCEEDED
        store.create_job(job_id(8), SPEC, 3.0, max_queued=10)
        store.request_cancel(job_id(8), 4.0)
        store.delete_job(job_id(8))
        store.create_job(job_id(9), SPEC, 5.0, max_queued=10)
        with store.db.read() as conn:
            numbers = dict(conn.execute(select(jobs.c.job_id, jobs.c.seq)).all())
        assert numbers == {job_id(7): 7, job_id(9): 9}, "the deleted job's seq 8 was not reused"
    finally:
        store.close()
    assert sqlite_integrity(path) == "ok"


def test_dataset_options_and_skipped_records_survive_a_restart(database: str | Path) -> None:
    options = DatasetOptions(label_studio=LabelStudioOptions("majority", "picture"))
    spec = dataclasses.replace(SPEC, dataset_uri="file:///data/export.json", dataset_options=options)
    skipped = (SkippedRecords("ALL_ANNOTATIONS_CANCELLED", "every annotation was cancelled", 12, ("7", "9")),)
    store = JobStore(database)
    store.open()
    try:
        store.create_job(job_id(1), spec, 1.0, max_queued=10)
        lease, _, _ = claim(store)
        store.claims.set_run_info(lease, dataclasses.replace(INFO, skipped=skipped), 3.0)
    finally:
        store.close()
    reopened = JobStore(database)
    reopened.open()
    try:
        job = reopened.get_job(job_id(1))
        assert job.spec.dataset_options == options
        assert job.run_info is not None
        assert job.run_info.skipped == skipped
    finally:
        reopened.close()


def test_a_store_migrated_by_a_newer_server_is_refused_untouched(tmp_path: Path) -> None:
    """A rollback after an upgrade: the older server names the revision it does not know and what
    to do, and writes nothing (its own head is not stamped over the newer schema)."""
    path = tmp_path / "jobs.sqlite3"
    store = JobStore(path)
    store.open()
    store.close()
    newer = sqlite3.connect(path)
    with newer:
        newer.execute("UPDATE alembic_version SET version_num = '0099'")
    newer.close()
    with pytest.raises(
        NewerSchemaError, match=rf"revision 0099, newer than this server's newest \({head_revision()}\)"
    ):
        JobStore(path).open()
    check = sqlite3.connect(path)
    assert check.execute("SELECT version_num FROM alembic_version").fetchall() == [("0099",)]
    check.close()
