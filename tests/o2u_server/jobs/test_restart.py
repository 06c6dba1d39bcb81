"""Durability across restarts: finished jobs keep their results, unfinished ones resume, a job that
keeps crashing its worker is failed, and `o2u-server` drains on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from o2u.v1 import scoring_pb2 as pb
from o2u.v1 import scoring_pb2_grpc
from o2u_server.domain import JobSpec, JobState
from o2u_server.jobs.store import JobStore
from tests.server_testing import (
    SLOW_CONFIG,
    TINY_CONFIG,
    create_job,
    running_server,
    sqlite_integrity,
    test_settings,
    wait_for_job,
)

Stub = scoring_pb2_grpc.ScoringServiceStub


def _states(state_dir: Path) -> dict[str, JobState]:
    store = JobStore(state_dir / "jobs.sqlite3")
    store.open()
    try:
        jobs = store.list_jobs(None, None, 1000)
        return {job.job_id: job.state for _, job in jobs}
    finally:
        store.close()
        assert sqlite_integrity(state_dir / "jobs.sqlite3") == "ok"


def test_finished_jobs_and_scores_survive_a_restart(data_root: Path, tmp_path: Path, digits_uri: str) -> None:
    settings = test_settings(state_dir=tmp_path / "state", data_roots=[data_root])
    with running_server(settings) as first, first.channel() as channel:
        stub = Stub(channel)
        job = wait_for_job(stub, create_job(stub, digits_uri).job_id)
        assert job.state == pb.JOB_STATE_SUCCEEDED
        page = stub.ListNoiseScores(pb.ListNoiseScoresRequest(job_id=job.job_id, page_size=50))
        events = list(stub.WatchScoringJob(pb.WatchScoringJobRequest(job_id=job.job_id)))
    # What a crash between a job's final state and the removal of its checkpoint leaves behind
    left = [settings.checkpoint_dir / f"{job.job_id}.pt", settings.checkpoint_dir / f"{job.job_id}.init.pt"]
    left.append(settings.checkpoint_dir / "job-deleted-meanwhile.pt")
    for path in left:
        path.write_bytes(b"a checkpoint")

    with running_server(settings) as second, second.channel() as channel:
        assert not any(path.exists() for path in left), "the start sweeps ended jobs' checkpoints"
        stub = Stub(channel)
        again = stub.GetScoringJob(pb.GetScoringJobRequest(job_id=job.job_id)).job
        assert again == job
        # A page token issued before the restart still works: the signing secret is in the store.
        following = stub.ListNoiseScores(
            pb.ListNoiseScoresRequest(job_id=job.job_id, page_size=50, page_token=page.next_page_token)
        )
        assert following.noise_scores[0].rank == 51
        assert following.total_size == page.total_size
        assert list(stub.WatchScoringJob(pb.WatchScoringJobRequest(job_id=job.job_id))) == events
        summary = stub.GetDatasetSummary(pb.GetDatasetSummaryRequest(job_id=job.job_id)).summary
        assert summary.num_samples == page.total_size


def test_unfinished_jobs_resume_after_a_restart(data_root: Path, tmp_path: Path, digits_uri: str) -> None:
    settings = test_settings(state_dir=tmp_path / "state", data_roots=[data_root])
    with running_server(settings) as first, first.channel() as channel:
        stub = Stub(channel)
        slow = create_job(stub, digits_uri, config=SLOW_CONFIG)
        queued = create_job(stub, digits_uri)
        deadline = time.monotonic() + 60
        while stub.GetScoringJob(pb.GetScoringJobRequest(job_id=slow.job_id)).job.progress.epoch < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        checkpoint = settings.checkpoint_dir / f"{slow.job_id}.pt"
    # The running job was stopped, not cancelled: back to QUEUED with its checkpoint kept.
    assert _states(settings.state_dir) == {slow.job_id: JobState.QUEUED, queued.job_id: JobState.QUEUED}
    assert checkpoint.exists()

    with running_server(settings) as second, second.channel() as channel:
        stub = Stub(channel)
        resumed = wait_for_job(stub, slow.job_id, states=(pb.JOB_STATE_RUNNING,))
        assert resumed.attempts == 2
        stub.CancelScoringJob(pb.CancelScoringJobRequest(job_id=slow.job_id))
        assert wait_for_job(stub, slow.job_id).state == pb.JOB_STATE_CANCELLED
        assert wait_for_job(stub, queued.job_id).state == pb.JOB_STATE_SUCCEEDED
        events = [r.event for r in stub.WatchScoringJob(pb.WatchScoringJobRequest(job_id=slow.job_id))]
        assert [e.sequence for e in events] == list(range(1, len(events) + 1))
        assert [e.state for e in events if e.type == pb.JOB_EVENT_TYPE_STATE_CHANGED] == [
            pb.JOB_STATE_QUEUED,
            pb.JOB_STATE_RUNNING,
            pb.JOB_STATE_QUEUED,  # the shutdown
            pb.JOB_STATE_RUNNING,
            pb.JOB_STATE_CANCELLED,
        ]
    assert not checkpoint.exists()


@pytest.mark.parametrize(("max_attempts", "final"), [(1, pb.JOB_STATE_FAILED), (2, pb.JOB_STATE_SUCCEEDED)])
def test_a_job_that_crashed_its_worker(
    data_root: Path, tmp_path: Path, digits_uri: str, max_attempts: int, final: int
) -> None:
    settings = test_settings(
        state_dir=tmp_path / "state", data_roots=[data_root], max_job_attempts=max_attempts
    )
    store = JobStore(settings.store_path)  # a process that died with its job RUNNING
    store.open()
    spec = JobSpec(dataset_uri=digits_uri, dataset_format=None, config=dict(TINY_CONFIG))
    job_id = "job-" + "ab" * 16
    store.create_job(job_id, spec, time.time(), max_queued=10)
    assert store.claims.claim_job("a-replica-that-crashed", time.time(), lease_seconds=30) is not None
    store.close()

    with running_server(settings) as running, running.channel() as channel:
        job = wait_for_job(Stub(channel), job_id)
    assert job.state == final
    if final == pb.JOB_STATE_FAILED:
        assert job.error.message.startswith(
            "the server process running this job ended abruptly (or stopped renewing its lease) 1 time,"
        )
        assert digits_uri in job.error.message
        assert job.error.reason == "TOO_MANY_ATTEMPTS"
        assert job.attempts == 1
    else:
        assert job.attempts == 2


def test_sigterm_drains_and_leaves_the_job_resumable(
    data_root: Path, tmp_path: Path, digits_uri: str
) -> None:
    state_dir = tmp_path / "state"
    env = {
        **os.environ,
        "O2U_LISTEN_ADDRESS": "127.0.0.1:0",
        "O2U_METRICS_PORT": "0",
        "O2U_METRICS_ADDRESS": "127.0.0.1",
        "O2U_STATE_DIR": str(state_dir),
        "O2U_DATA_ROOTS": str(data_root),
        "O2U_DEVICE": "cpu",
        "O2U_SHUTDOWN_GRACE_SECONDS": "5",
        "O2U_CPU_THREADS": "1",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "o2u_server.main"], env=env, stderr=subprocess.PIPE, text=True
    )
    assert process.stderr is not None
    try:
        lines: list[dict[str, object]] = []
        while not any(line.get("message", "").startswith("o2u-server") for line in lines):  # type: ignore[union-attr]
            text = process.stderr.readline()
            assert text, f"the server exited early: {lines}"
            lines.append(json.loads(text))  # every log line is one JSON object
        port = next(line["port"] for line in lines if "port" in line)
        listening = next(line for line in lines if str(line.get("message", "")).startswith("o2u-server"))
        assert listening["cpu_threads"] == 1  # O2U_CPU_THREADS sized torch's thread pool
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = Stub(channel)
            job = create_job(stub, digits_uri, config=SLOW_CONFIG)
            wait_for_job(stub, job.job_id, states=(pb.JOB_STATE_RUNNING,))
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0
            assert time.monotonic() - started < 5 + 3  # the grace period, plus process exit
        rest = [json.loads(line) for line in process.stderr.read().splitlines() if line.strip()]
        assert any(line["message"] == "shutting down" for line in rest)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
    assert _states(state_dir) == {job.job_id: JobState.QUEUED}
