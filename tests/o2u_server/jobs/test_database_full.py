"""A PostgreSQL job database out of disk, for real, and one that does not answer.

The test database's tables live in a tablespace on a small tmpfs (its WAL stays on the cluster's own
disk, as a production database's often does), which is filled up with a ballast file: PostgreSQL
then refuses to extend a table ("could not extend file ... No space left on device", SQLSTATE
53100). The store answers DATABASE_FULL (RESOURCE_EXHAUSTED with RetryInfo), rolls back, keeps
reading, and writes again once space is freed; a server training a job when the disk fills stores
its results as soon as it can. A database that does not answer is DATABASE_UNAVAILABLE (UNAVAILABLE
with RetryInfo) once the store's retry time is over.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from o2u.v1 import scoring_pb2 as pb
from o2u.v1 import scoring_pb2_grpc
from o2u_server.domain import JobSpec, JobState
from o2u_server.errors import StateStoreFull, Unavailable
from o2u_server.jobs.store import JobStore
from tests.o2u_server.jobs.full_volumes import fill, mounted_tmpfs
from tests.o2u_server.jobs.store_testing import INFO, claim, job_id, score_rows, summary
from tests.postgres_server import PostgresServer
from tests.server_testing import TINY_CONFIG, create_job, running_server, test_settings, wait_for_job

Stub = scoring_pb2_grpc.ScoringServiceStub
VOLUME_BYTES = 16 * 1024 * 1024


@dataclass
class SmallDatabase:
    url: str
    volume: Path  # where its tables live


@pytest.fixture
def small_database(postgres: PostgresServer) -> Iterator[SmallDatabase]:
    """A fresh database whose new tables go to a tablespace on a 16 MiB tmpfs (in a folder the
    `postgres` user can reach, unlike pytest's private temporary folders)."""
    name = f"small_{uuid.uuid4().hex[:12]}"
    folder = Path(tempfile.mkdtemp(prefix="o2u-tablespace-", dir="/tmp"))
    os.chmod(folder, 0o755)
    try:
        owner = "postgres" if os.geteuid() == 0 else None
        with mounted_tmpfs(folder / "volume", VOLUME_BYTES, owner=owner) as volume:
            postgres.sql(f"CREATE TABLESPACE {name} LOCATION '{volume}'")
            url = postgres.new_database()
            database = url.rsplit("/", 1)[1]
            postgres.sql(f"ALTER DATABASE {database} SET default_tablespace = {name}")
            try:
                yield SmallDatabase(url, volume)
            finally:
                (volume / "ballast").unlink(missing_ok=True)
                postgres.sql(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
                postgres.sql(f"DROP TABLESPACE IF EXISTS {name}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_a_full_database_disk_is_database_full_and_writes_work_again_after(
    small_database: SmallDatabase,
) -> None:
    store = JobStore(small_database.url)
    store.open()  # the migrations create the tables in the small tablespace
    try:
        store.create_job(job_id(1), JobSpec("file:///d/1.npz", None, {}), 1.0, max_queued=10)
        lease, _, _ = claim(store)
        ballast = fill(small_database.volume)
        rows = score_rows(50_000)  # a few MB of scores: the table must grow
        with pytest.raises(StateStoreFull) as caught:
            store.claims.save_results(lease, rows, ["a", "b"], summary(job_id(1)), INFO, 3.0)
        assert (caught.value.reason, caught.value.code.name) == ("DATABASE_FULL", "RESOURCE_EXHAUSTED")
        assert caught.value.retry_after_seconds
        assert "127.0.0.1" not in caught.value.message  # no server address for callers
        job = store.get_job(job_id(1))  # reads work, and the failed write left nothing behind
        assert (job.state, job.last_sequence) == (JobState.RUNNING, 2)

        ballast.unlink()  # the operator frees space; the same store goes on
        done = store.claims.save_results(lease, rows, ["a", "b"], summary(job_id(1)), INFO, 4.0)
        assert done.state is JobState.SUCCEEDED
    finally:
        store.close()


def test_a_job_training_when_the_database_disk_fills_succeeds_once_space_is_freed(
    small_database: SmallDatabase,
    tmp_path: Path,
    data_root: Path,
    digits_uri: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = test_settings(
        state_dir=tmp_path / "state", data_roots=[data_root], database_url=small_database.url
    )
    with running_server(settings) as server, server.channel() as channel:
        stub = Stub(channel)
        job = create_job(stub, digits_uri, config={**TINY_CONFIG, "pretrain_epochs": 40})
        deadline = time.monotonic() + 60
        while stub.GetScoringJob(pb.GetScoringJobRequest(job_id=job.job_id)).job.progress.epoch < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        ballast = fill(small_database.volume)
        time.sleep(3)  # training goes on; events that do not fit are skipped, results wait for room
        assert (
            stub.GetScoringJob(pb.GetScoringJobRequest(job_id=job.job_id)).job.state == pb.JOB_STATE_RUNNING
        )
        refused = [r for r in caplog.records if "is out of space" in r.getMessage()]
        assert refused, "the database refused a write while its disk was full"
        ballast.unlink()
        finished = wait_for_job(stub, job.job_id, timeout=120)
        assert finished.state == pb.JOB_STATE_SUCCEEDED, finished.error
        page = stub.ListNoiseScores(pb.ListNoiseScoresRequest(job_id=job.job_id, page_size=1))
        assert page.total_size == 400
        events = [r.event for r in stub.WatchScoringJob(pb.WatchScoringJobRequest(job_id=job.job_id))]
        assert [event.sequence for event in events] == list(range(1, len(events) + 1))


def test_a_database_that_does_not_answer_is_database_unavailable() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = JobStore(f"postgresql://postgres@127.0.0.1:{port}/o2u", retry_seconds=0.5)
    with pytest.raises(Unavailable) as caught:
        store.open()
    assert (caught.value.reason, caught.value.code.name) == ("DATABASE_UNAVAILABLE", "UNAVAILABLE")
    assert caught.value.retry_after_seconds
