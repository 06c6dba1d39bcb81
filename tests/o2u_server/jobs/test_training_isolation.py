"""Jobs trained in the worker slot's training process (O2U_TRAINING_ISOLATION=process), through the
real server: the process starts with the server and serves one job after another, the scores are
those of training in the server's thread, a cancel stops the training and keeps the process, and
a killed training process puts the job back in the queue to resume from its checkpoint (the same
scores again) while the server keeps answering; in a /dev/shm of the server's own, samples that do
not fit fail the job at once, and every job gives its shared memory back."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from o2u.v1 import scoring_pb2 as pb
from o2u.v1 import scoring_pb2_grpc
from tests.server_process import ServerProcess, own_shm, require_own_mounts
from tests.server_testing import (
    assert_requeued_and_resumed,
    child_pids,
    create_job,
    running_server,
    test_settings,
    wait_for_job,
    write_noisy_digits,
)

Stub = scoring_pb2_grpc.ScoringServiceStub
CONFIG: dict[str, Any] = {
    "model": "mlp",
    "seed": 5,
    "pretrain_epochs": 2,
    "cycle_length_epochs": 2,
    "num_cycles": 3,
    "pretrain_batch_size": 64,
    "cyclic_batch_size": 32,
}
LONG_CONFIG = {**CONFIG, "num_cycles": 60}  # long enough to be stopped mid-run


def _digits(tmp_path: Path) -> tuple[str, Path]:
    root = tmp_path / "data"
    write_noisy_digits(root / "digits.npz", noise=0.2)
    return (root / "digits.npz").as_uri(), root


def _scores(stub: Stub, job_id: str) -> dict[int, float]:
    request = pb.ListNoiseScoresRequest(job_id=job_id, page_size=5000)
    return {s.sample_id: s.score for s in stub.ListNoiseScores(request, timeout=30).noise_scores}


def _wait_cyclic(stub: Stub, job_id: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    request = pb.GetScoringJobRequest(job_id=job_id)
    while (job := stub.GetScoringJob(request, timeout=10).job).progress.stage != pb.STAGE_CYCLIC:
        assert job.state in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING), job
        assert time.monotonic() < deadline
        time.sleep(0.05)


def _wait_no_training_process(timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while child_pids("o2u-training") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert child_pids("o2u-training") == set()


def test_the_training_process_scores_as_the_server_thread_does(tmp_path: Path) -> None:
    uri, root = _digits(tmp_path)
    settings = test_settings(state_dir=tmp_path / "thread", data_roots=[root])
    with running_server(settings) as server, server.channel() as channel:
        stub = Stub(channel)
        in_thread = _scores(stub, wait_for_job(stub, create_job(stub, uri, CONFIG).job_id).job_id)
        assert child_pids("o2u-training") == set()

    settings = test_settings(state_dir=tmp_path / "process", data_roots=[root], training_isolation="process")
    with running_server(settings) as server, server.channel() as channel:
        stub = Stub(channel)
        started = child_pids("o2u-training")
        assert len(started) == 1  # started with the server, before any job
        first = wait_for_job(stub, create_job(stub, uri, CONFIG).job_id)
        second = wait_for_job(stub, create_job(stub, uri, CONFIG).job_id)
        assert (first.state, second.state) == (pb.JOB_STATE_SUCCEEDED,) * 2, (first.error, second.error)
        assert _scores(stub, first.job_id) == in_thread  # score for score
        assert _scores(stub, second.job_id) == in_thread
        assert child_pids("o2u-training") == started  # both jobs in the same process
    _wait_no_training_process()  # stopped with the server


def test_cancel_stops_the_training_and_keeps_the_process(tmp_path: Path) -> None:
    uri, root = _digits(tmp_path)
    settings = test_settings(state_dir=tmp_path / "state", data_roots=[root], training_isolation="process")
    with running_server(settings) as server, server.channel() as channel:
        stub = Stub(channel)
        started = child_pids("o2u-training")
        job_id = create_job(stub, uri, LONG_CONFIG).job_id
        _wait_cyclic(stub, job_id)
        stub.CancelScoringJob(pb.CancelScoringJobRequest(job_id=job_id), timeout=10)
        assert wait_for_job(stub, job_id, timeout=30).state == pb.JOB_STATE_CANCELLED
        assert child_pids("o2u-training") == started
        after = wait_for_job(stub, create_job(stub, uri, CONFIG).job_id)
        assert after.state == pb.JOB_STATE_SUCCEEDED, after.error
        assert child_pids("o2u-training") == started


def test_a_killed_training_process_is_retried_from_the_checkpoint(tmp_path: Path) -> None:
    uri, root = _digits(tmp_path)
    config = {**CONFIG, "num_cycles": 8}
    settings = test_settings(
        state_dir=tmp_path / "state",
        data_roots=[root],
        training_isolation="process",
        checkpoint_interval_seconds=0,
    )
    with running_server(settings) as server, server.channel() as channel:
        stub = Stub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        reference = wait_for_job(stub, create_job(stub, uri, config).job_id)
        assert reference.state == pb.JOB_STATE_SUCCEEDED, reference.error
        job_id = create_job(stub, uri, config).job_id
        _wait_cyclic(stub, job_id)
        (killed,) = child_pids("o2u-training")
        os.kill(killed, signal.SIGKILL)
        answer = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING  # the server lives on
        job = wait_for_job(stub, job_id, timeout=240)
        assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
        assert job.attempts == 2
        assert _scores(stub, job_id) == _scores(stub, reference.job_id)  # as if never interrupted
        events = [r.event for r in stub.WatchScoringJob(pb.WatchScoringJobRequest(job_id=job_id), timeout=30)]
        fresh = child_pids("o2u-training")
        assert re.search(r"^o2u_training_worker_failures_total 1\.0$", server.scrape(), re.MULTILINE)
        assert len(fresh) == 1
        assert killed not in fresh  # the next attempt started a new one
    assert_requeued_and_resumed(events, "the training process was killed by signal 9")


def _gone(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    return not status.exists() or "zombie" in status.read_text()


def test_o2u_server_drains_a_training_process_job_on_sigterm_and_resumes_it(tmp_path: Path) -> None:
    """`o2u-server` itself: a SIGTERM sent to the training process too (a Ctrl-C reaches the
    whole process group) leaves the draining to the server, which checkpoints the job, puts it
    back in the queue and exits leaving no training process; restarted, it finishes the job."""
    uri, root = _digits(tmp_path)
    server = ServerProcess(
        tmp_path / "state",
        root,
        O2U_TRAINING_ISOLATION="process",
        O2U_CHECKPOINT_INTERVAL_SECONDS="0",
        O2U_SHUTDOWN_GRACE_SECONDS="10",
        O2U_CPU_THREADS="1",
    )
    try:
        server.start()
        with grpc.insecure_channel(server.address) as channel:
            stub = Stub(channel)
            # 30 cyclic epochs: stopped after the first, then trained to the end after the restart
            job_id = create_job(stub, uri, {**CONFIG, "num_cycles": 15}).job_id
            _wait_cyclic(stub, job_id)
        (training,) = server.spawned_children()
        os.kill(training, signal.SIGINT)
        os.kill(training, signal.SIGTERM)
        server.signal(signal.SIGTERM)  # exit status 0: drained in time
        deadline = time.monotonic() + 15
        while not _gone(training) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(training)
        server.start()
        with grpc.insecure_channel(server.address) as channel:
            stub = Stub(channel)
            job = wait_for_job(stub, job_id, timeout=240)
            assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
            assert job.attempts == 2
            events = [
                r.event for r in stub.WatchScoringJob(pb.WatchScoringJobRequest(job_id=job_id), timeout=30)
            ]
    finally:
        server.stop()
    released = [e for e in events if e.state == pb.JOB_STATE_QUEUED and "shutting down" in e.message]
    assert len(released) == 1  # a drain, not a crash of the training process
    resumed = next(
        e for e in events if e.sequence > released[0].sequence and e.progress.stage == pb.STAGE_CYCLIC
    )
    assert resumed.progress.epoch > 1  # resumed from the epoch the drain checkpointed


SMALL_SHM = own_shm("64k")


def test_samples_that_do_not_fit_shared_memory_fail_the_job_at_once(tmp_path: Path) -> None:
    """A real /dev/shm too small for the digits: the job fails RESOURCE_EXHAUSTED on its first
    attempt, saying what to do, instead of being retried as a dead worker; the server serves on."""
    require_own_mounts()
    uri, root = _digits(tmp_path)
    server = ServerProcess(tmp_path / "state", root, wrapper=SMALL_SHM, O2U_TRAINING_ISOLATION="process")
    try:
        server.start()
        with grpc.insecure_channel(server.address) as channel:
            stub = Stub(channel)
            job = wait_for_job(stub, create_job(stub, uri, CONFIG).job_id)
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
            metrics = server.scrape()
    finally:
        server.stop()
    assert job.state == pb.JOB_STATE_FAILED, job
    assert job.attempts == 1
    assert (job.error.code, job.error.reason) == (8, "SHARED_MEMORY_FULL"), job.error  # RESOURCE_EXHAUSTED
    assert "do not fit in the server's shared memory (/dev/shm)" in job.error.message
    assert "shm.sizeLimit" in job.error.message
    assert "torch_" not in job.error.message  # torch's name for the segment is for the log
    assert re.search(r"^o2u_training_worker_failures_total 0\.0$", metrics, re.MULTILINE)
    assert "No space left on device" in server.log_tail(20_000)  # the operator's log has the cause


def test_every_job_gives_its_shared_memory_back(tmp_path: Path) -> None:
    """Each job's samples live in /dev/shm while it trains and are freed when it ends: in a /dev/shm
    with room for the digits' samples three times but not four, six jobs in a row all succeed, and
    it is as empty after them and a cancelled one as before, by the server's own metrics (a leak
    would fail the fourth SHARED_MEMORY_FULL)."""
    require_own_mounts()
    uri, root = _digits(tmp_path)
    server = ServerProcess(
        tmp_path / "state", root, wrapper=own_shm("400k"), O2U_TRAINING_ISOLATION="process"
    )
    try:
        server.start()
        size, before = (
            server.gauge("o2u_shared_memory_size_bytes"),
            server.gauge("o2u_shared_memory_used_bytes"),
        )
        with grpc.insecure_channel(server.address) as channel:
            stub = Stub(channel)
            jobs = [
                wait_for_job(stub, create_job(stub, uri, {**CONFIG, "seed": seed}).job_id)
                for seed in range(6)
            ]
            cancelled = create_job(stub, uri, LONG_CONFIG).job_id  # and one that ends early
            _wait_cyclic(stub, cancelled)
            stub.CancelScoringJob(pb.CancelScoringJobRequest(job_id=cancelled), timeout=10)
            jobs.append(wait_for_job(stub, cancelled))
        after = server.gauge("o2u_shared_memory_used_bytes")
    finally:
        server.stop()
    states = [pb.JOB_STATE_SUCCEEDED] * 6 + [pb.JOB_STATE_CANCELLED]
    assert [job.state for job in jobs] == states, [job.error for job in jobs]
    assert size == 400 * 1024  # the metrics read the server's own /dev/shm
    assert after <= before + 64 * 1024, (before, after)
