"""A full state volume, for real: the state folder is a small tmpfs filled up while the server runs.

New work is refused with RESOURCE_EXHAUSTED (STATE_DISK_FULL, with RetryInfo), every read keeps
working, a job that is training when the volume fills goes on (its checkpoints are skipped, its state
changes wait for room), and once space is freed the server works again without a restart. Mounting a
tmpfs needs root (CAP_SYS_ADMIN); where the test process may not mount, the tests skip.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import Column, LargeBinary, MetaData, Table, func, select

from o2u.v1 import scoring_pb2 as pb
from o2u.v1 import scoring_pb2_grpc
from o2u_engine.checkpoint import Checkpoints
from o2u_server.errors import StateStoreFull
from o2u_server.jobs.database import Database
from tests.o2u_server.jobs.full_volumes import fill, mounted_tmpfs
from tests.server_testing import (
    TINY_CONFIG,
    call_error,
    create_job,
    running_server,
    test_settings,
    wait_for_job,
)

Stub = scoring_pb2_grpc.ScoringServiceStub
VOLUME_BYTES = 8 * 1024 * 1024


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Path]:
    """An empty 8 MiB tmpfs, unmounted afterwards."""
    with mounted_tmpfs(tmp_path / "volume", VOLUME_BYTES) as mount_point:
        yield mount_point


def test_store_writes_on_a_full_volume_are_state_store_full_and_work_again_after(volume: Path) -> None:
    database = Database(volume / "jobs.sqlite3")
    database.open()
    blobs = Table("blobs", MetaData(), Column("data", LargeBinary))
    count = select(func.count()).select_from(blobs)
    try:
        with database.write() as conn:
            blobs.create(conn)
        ballast = fill(volume)
        with pytest.raises(StateStoreFull) as caught, database.write() as conn:
            conn.execute(blobs.insert().values(data=b"x" * 1024 * 1024))
        assert caught.value.reason == "STATE_DISK_FULL"
        assert caught.value.retry_after_seconds
        with database.read() as conn:  # reads work
            assert conn.execute(count).scalar_one() == 0
        ballast.unlink()
        with database.write() as conn:  # the same connections, no restart
            conn.execute(blobs.insert().values(data=b"x" * 1024 * 1024))
        with database.read() as conn:
            assert conn.execute(count).scalar_one() == 1
    finally:
        database.close()


def test_a_checkpoint_that_does_not_fit_is_skipped_not_fatal(volume: Path) -> None:
    checkpoints = Checkpoints(str(volume / "job.pt"), "fingerprint")
    fill(volume)
    checkpoints.keep({"weights": b"\1" * (1024 * 1024)}, force=True)
    assert checkpoints.failed_writes == 1
    assert sorted(path.name for path in volume.iterdir()) == ["ballast"]  # no temporary file left


def _serving(channel: grpc.Channel) -> bool:
    answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


def test_a_full_state_volume_refuses_new_work_keeps_reads_and_recovers_by_itself(
    volume: Path, data_root: Path, digits_uri: str
) -> None:
    settings = test_settings(
        state_dir=volume / "state", data_roots=[data_root], min_free_state_bytes=1024 * 1024
    )
    with running_server(settings) as server, server.channel() as channel:
        stub = Stub(channel)
        done = wait_for_job(stub, create_job(stub, digits_uri).job_id)
        assert done.state == pb.JOB_STATE_SUCCEEDED
        assert server.gauge("o2u_state_volume_min_free_bytes") == 1024 * 1024
        assert server.gauge("o2u_state_volume_free_bytes") > 1024 * 1024
        ballast = fill(volume)
        assert server.gauge("o2u_state_volume_free_bytes") < 1024 * 1024  # read at the scrape

        refused = call_error(lambda: create_job(stub, digits_uri))
        assert (refused.code, refused.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "STATE_DISK_FULL")
        assert refused.retry_delay_seconds is not None
        assert stub.GetScoringJob(pb.GetScoringJobRequest(job_id=done.job_id)).job.state == done.state
        scores = stub.ListNoiseScores(pb.ListNoiseScoresRequest(job_id=done.job_id, page_size=10))
        assert len(scores.noise_scores) == 10
        assert stub.GetDatasetSummary(pb.GetDatasetSummaryRequest(job_id=done.job_id)).summary.num_samples
        assert list(stub.WatchScoringJob(pb.WatchScoringJobRequest(job_id=done.job_id)))
        assert _serving(channel)

        ballast.unlink()  # an operator frees space; nothing is restarted
        assert server.gauge("o2u_state_volume_free_bytes") > 1024 * 1024
        again = wait_for_job(stub, create_job(stub, digits_uri).job_id)
        assert again.state == pb.JOB_STATE_SUCCEEDED, again.error


def test_a_job_training_when_the_volume_fills_finishes_once_space_is_freed(
    volume: Path, data_root: Path, digits_uri: str
) -> None:
    settings = test_settings(
        state_dir=volume / "state",
        data_roots=[data_root],
        checkpoint_interval_seconds=0,  # a checkpoint after every epoch: each one now fails
        min_free_state_bytes=1024 * 1024,
    )
    config = {**TINY_CONFIG, "pretrain_epochs": 40}
    with running_server(settings) as server, server.channel() as channel:
        stub = Stub(channel)
        job = create_job(stub, digits_uri, config=config)
        deadline = time.monotonic() + 60
        while stub.GetScoringJob(pb.GetScoringJobRequest(job_id=job.job_id)).job.progress.epoch < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        ballast = fill(volume)
        time.sleep(3)  # training goes on meanwhile, then its results wait for room
        assert _serving(channel)
        ballast.unlink()
        finished = wait_for_job(stub, job.job_id, timeout=120)
        assert finished.state == pb.JOB_STATE_SUCCEEDED, finished.error
        page = stub.ListNoiseScores(pb.ListNoiseScoresRequest(job_id=job.job_id, page_size=1))
        assert page.total_size == 400
        events = [r.event for r in stub.WatchScoringJob(pb.WatchScoringJobRequest(job_id=job.job_id))]
        assert [event.sequence for event in events] == list(range(1, len(events) + 1))
