"""Datasets that change, block or vanish under a job, on live servers.

A user re-saving or truncating an .npz while its job trains, a FIFO swapped in for a dataset file
while the job waits in the queue, a dataset fixed after a crash, a checkpoint the engine cannot read,
and a slow object store while the job is cancelled or the server shuts down. The server must keep
training on the data it loaded (it owns that memory), notice a changed dataset at the next attempt
(FAILED_PRECONDITION naming the dataset, never a silent re-run on other data), refuse anything that
is not a regular file without waiting on it, and stop a load when asked, releasing the state folder.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from o2u.v1 import scoring_pb2 as pb
from o2u.v1 import scoring_pb2_grpc
from o2u_server.jobs.store import JobStore
from tests.o2u_server.tcp_proxy import ThrottledProxy
from tests.s3_server import S3Server
from tests.server_process import ServerProcess
from tests.server_testing import (
    SLOW_CONFIG,
    TINY_CONFIG,
    RunningServer,
    create_job,
    running_server,
    test_settings,
    wait_for_job,
    write_noisy_digits,
)

Stub = scoring_pb2_grpc.ScoringServiceStub
BUCKET = "datasets"
OBJECT_BYTES = 4 * 1024 * 1024
GRACE_SECONDS = 10.0  # the drain test's shutdown grace


def _progress(
    stub: Stub, job_id: str, predicate: Callable[[pb.ScoringJob], bool], timeout: float = 60
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate(job := stub.GetScoringJob(pb.GetScoringJobRequest(job_id=job_id), timeout=10).job):
        assert job.state in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING), job
        assert time.monotonic() < deadline, job
        time.sleep(0.02)


def _training(job: pb.ScoringJob) -> bool:
    return job.progress.stage == pb.STAGE_PRETRAINING and job.progress.epoch >= 2


def _events(stub: Stub, job_id: str) -> list[pb.JobEvent]:
    return [r.event for r in stub.WatchScoringJob(pb.WatchScoringJobRequest(job_id=job_id), timeout=30)]


@pytest.mark.parametrize("change", ["re-saved", "truncated"])
def test_an_npz_changed_while_its_job_trains_is_noticed_at_the_next_attempt(
    tmp_path: Path, change: str
) -> None:
    root = tmp_path / "data"
    write_noisy_digits(root / "digits.npz", samples=400)
    uri = (root / "digits.npz").as_uri()
    settings = test_settings(state_dir=tmp_path / "state", data_roots=[root], checkpoint_interval_seconds=0)
    with running_server(settings) as first, first.channel() as channel:
        stub = Stub(channel)
        job = create_job(stub, uri, config=SLOW_CONFIG)
        _progress(stub, job.job_id, _training)
        if change == "re-saved":  # a user saving a new version over the file, as np.savez does
            write_noisy_digits(root / "digits.npz", samples=300, seed=5)
        else:
            os.truncate(root / "digits.npz", 100)
        # The job trains on memory the server owns: it goes on, and so does the server (a mapped
        # file truncated under a running job used to kill the whole process with SIGBUS).
        epoch = stub.GetScoringJob(pb.GetScoringJobRequest(job_id=job.job_id)).job.progress.epoch
        _progress(stub, job.job_id, lambda now: now.progress.epoch >= epoch + 2)
    # The drain requeued it; the next attempt loads the dataset again and finds it changed.
    with running_server(settings) as second, second.channel() as channel:
        stub = Stub(channel)
        failed = wait_for_job(stub, job.job_id, timeout=60)
    assert failed.state == pb.JOB_STATE_FAILED
    if change == "re-saved":
        assert (failed.error.code, failed.error.reason) == (9, "DATASET_CHANGED")  # FAILED_PRECONDITION
        assert uri in failed.error.message
    else:
        assert failed.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]  # no longer a zip
    assert str(settings.state_dir) not in failed.error.message
    assert not (settings.checkpoint_dir / f"{job.job_id}.pt").exists()


def test_a_dataset_fixed_after_a_crash_fails_with_a_message_the_caller_can_act_on(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_noisy_digits(root / "digits.npz", samples=400)
    uri = (root / "digits.npz").as_uri()
    server = ServerProcess(tmp_path / "state", root, O2U_CHECKPOINT_INTERVAL_SECONDS="0")
    try:
        server.start()
        with grpc.insecure_channel(server.address) as channel:
            stub = Stub(channel)
            job = create_job(stub, uri, config=SLOW_CONFIG)
            _progress(stub, job.job_id, _training)
        server.signal(signal.SIGKILL)
        data = np.load(root / "digits.npz")
        labels = data["y"].copy()
        labels[:40] = (labels[:40] + 1) % 10  # the user fixes (here: changes) some labels
        np.savez(root / "digits.npz", x=data["x"], y=labels, ids=data["ids"], class_names=data["class_names"])
        server.start()
        with grpc.insecure_channel(server.address) as channel:
            failed = wait_for_job(Stub(channel), job.job_id, timeout=60)
    finally:
        server.stop()
    assert failed.state == pb.JOB_STATE_FAILED
    assert (failed.error.code, failed.error.reason) == (9, "DATASET_CHANGED")
    assert uri in failed.error.message
    assert "submit a new job" in failed.error.message
    assert "checkpoint" not in failed.error.message
    assert str(tmp_path / "state") not in failed.error.message


def test_a_checkpoint_the_engine_cannot_read_is_discarded_and_the_job_starts_over(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_noisy_digits(root / "digits.npz", samples=400)
    settings = test_settings(state_dir=tmp_path / "state", data_roots=[root])
    with running_server(settings) as reference, reference.channel() as channel:
        stub = Stub(channel)
        clean = wait_for_job(stub, create_job(stub, (root / "digits.npz").as_uri()).job_id)
        request = pb.ListNoiseScoresRequest(job_id=clean.job_id)
        expected = [score.score for score in stub.ListNoiseScores(request).noise_scores]
    store = JobStore(settings.store_path)  # a job that crashed, leaving a damaged checkpoint
    store.open()
    spec = store.get_job(clean.job_id).spec
    job_id = "job-" + "cd" * 16
    store.create_job(job_id, spec, time.time(), max_queued=10)
    assert store.claims.claim_job("a-server-that-crashed", time.time(), lease_seconds=30) is not None
    store.close()
    (settings.checkpoint_dir / f"{job_id}.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    with running_server(settings) as again, again.channel() as channel:
        stub = Stub(channel)
        job = wait_for_job(stub, job_id)
        assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
        request = pb.ListNoiseScoresRequest(job_id=job_id)
        scores = [score.score for score in stub.ListNoiseScores(request).noise_scores]
    assert scores == expected  # started over: the same scores as a run that never had a checkpoint


@pytest.mark.parametrize("kind", ["npz", "manifest-key"])
def test_a_fifo_swapped_in_while_the_job_waits_is_refused_without_waiting(
    start_server: Callable[..., RunningServer], data_root: Path, digits_uri: str, kind: str
) -> None:
    folder = data_root / f"fifo-{kind}"
    folder.mkdir(exist_ok=True)
    write_noisy_digits(folder / "digits.npz", samples=120)
    (folder / "labels.csv").write_text("key,label\nimage.png,0\n")
    (folder / "image.png").write_bytes(b"a regular file at submission")
    server = start_server()
    with server.channel() as channel:
        stub = Stub(channel)
        blocker = create_job(stub, digits_uri, config=SLOW_CONFIG)
        _progress(stub, blocker.job_id, lambda job: job.state == pb.JOB_STATE_RUNNING)
        target = folder / ("digits.npz" if kind == "npz" else "image.png")
        uri = (folder / ("digits.npz" if kind == "npz" else "labels.csv")).as_uri()
        job = create_job(stub, uri, config=TINY_CONFIG)  # checked at submission: a regular file
        target.unlink()
        os.mkfifo(target)  # nobody ever writes to it: a blocking open() would wait forever
        stub.CancelScoringJob(pb.CancelScoringJobRequest(job_id=blocker.job_id))
        failed = wait_for_job(stub, job.job_id, timeout=30)
    assert failed.state == pb.JOB_STATE_FAILED
    assert (failed.error.code, failed.error.reason) == (
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
        "NOT_A_FILE",
    )


@pytest.fixture
def slow_store(s3: S3Server, tmp_path: Path) -> Iterator[ThrottledProxy]:
    """The S3 server behind a proxy relaying 512 KB/s, with a 4 MiB .npz in it: 8 s to download."""
    s3.reset()
    s3.make_bucket(BUCKET)
    path = tmp_path / "slow.npz"
    rng = np.random.default_rng(0)
    features = rng.normal(size=(OBJECT_BYTES // 256, 64)).astype(np.float32)
    np.savez(path, x=features, y=np.arange(len(features)) % 4)
    s3.put(BUCKET, "slow/big.npz", path.read_bytes())
    path.unlink()
    proxy = ThrottledProxy(s3.endpoint, bytes_per_second=512 * 1024)
    yield proxy
    proxy.cut()


def _loading_started(job: pb.ScoringJob) -> bool:
    return job.progress.stage == pb.STAGE_LOADING and job.progress.bytes_read > 0


def test_a_job_cancelled_while_loading_stops_reading(
    start_server: Callable[..., RunningServer], s3: S3Server, slow_store: ThrottledProxy
) -> None:
    settings = s3.settings_kwargs() | {"s3_endpoint": slow_store.endpoint}
    server = start_server(s3_allowed_buckets=[BUCKET], **settings)
    with server.channel() as channel:
        stub = Stub(channel)
        job = create_job(stub, f"s3://{BUCKET}/slow/big.npz")
        _progress(stub, job.job_id, _loading_started)  # LOADING reports what it has read
        stub.CancelScoringJob(pb.CancelScoringJobRequest(job_id=job.job_id))
        cancelled = wait_for_job(stub, job.job_id, timeout=15)
        assert cancelled.state == pb.JOB_STATE_CANCELLED
        stages = {e.progress.stage for e in _events(stub, job.job_id) if e.type == pb.JOB_EVENT_TYPE_PROGRESS}
    assert stages == {pb.STAGE_LOADING}
    assert slow_store.forwarded < OBJECT_BYTES  # it stopped reading, it did not finish the download


def test_sigterm_while_loading_stops_within_the_grace_and_frees_the_state_folder(
    tmp_path: Path, s3: S3Server, slow_store: ThrottledProxy
) -> None:
    server = ServerProcess(
        tmp_path / "state",
        tmp_path,
        O2U_SHUTDOWN_GRACE_SECONDS=str(GRACE_SECONDS),
        O2U_S3_ENDPOINT=slow_store.endpoint,
        O2U_S3_ACCESS_KEY=s3.access_key,
        O2U_S3_SECRET_KEY=s3.secret_key,
        O2U_S3_SECURE="false",
        O2U_S3_REGION=s3.region,
    )
    try:
        server.start()
        with grpc.insecure_channel(server.address) as channel:
            stub = Stub(channel)
            job = create_job(stub, f"s3://{BUCKET}/slow/big.npz")
            _progress(stub, job.job_id, _loading_started)
        assert server.signal(signal.SIGTERM) < GRACE_SECONDS + 5
    finally:
        server.stop()
    store = JobStore(tmp_path / "state" / "jobs.sqlite3")
    store.open()  # the lock is free: a replacement server can start at once
    try:
        assert store.get_job(job.job_id).state.value == "queued"  # it resumes on the next start
    finally:
        store.close()
    shutil.rmtree(tmp_path / "state", ignore_errors=True)
