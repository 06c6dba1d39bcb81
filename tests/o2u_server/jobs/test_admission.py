"""Admission control: what the server refuses when it is full, and how a job ends when its data or
the device is too big for it.

A full queue and too many watch streams are RESOURCE_EXHAUSTED with a RetryInfo delay, while health
and ordinary calls keep answering. Dataset limits fail the job with RESOURCE_EXHAUSTED naming the
limit and its setting. Device out-of-memory is injected through the engine's fault hook: a transient
one is absorbed by halving the batch size, a persistent one fails the job with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

import o2u_engine
from o2u.v1 import scoring_pb2 as pb
from o2u.v1 import scoring_pb2_grpc
from o2u_server import app
from o2u_server.jobs.engine import Engine
from tests.o2u_server.dataset_files import png
from tests.o2u_server.tcp_proxy import ThrottledProxy
from tests.server_testing import (
    SLOW_CONFIG,
    RunningServer,
    call_error,
    create_job,
    running_server,
    test_settings,
    wait_for_job,
)

Stub = scoring_pb2_grpc.ScoringServiceStub
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def _serving(channel: grpc.Channel) -> bool:
    answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


def test_full_queue_and_too_many_streams_are_refused_while_health_answers(
    start_server: Callable[..., RunningServer], digits_uri: str
) -> None:
    running = start_server(max_queued_jobs=2, max_watch_streams=3)
    with running.channel() as channel, running.channel() as probe:
        stub = Stub(channel)
        busy = create_job(stub, digits_uri, config=SLOW_CONFIG)
        wait_for_job(stub, busy.job_id, states=(pb.JOB_STATE_RUNNING,))
        queued = [create_job(stub, digits_uri) for _ in range(2)]
        full = call_error(lambda: create_job(stub, digits_uri))
        assert (full.code, full.reason) == (EXHAUSTED, "QUEUE_FULL")
        assert full.retry_delay_seconds is not None
        assert full.retry_delay_seconds > 0
        assert _serving(probe)

        request = pb.WatchScoringJobRequest(job_id=busy.job_id)
        streams = [iter(stub.WatchScoringJob(request, timeout=120)) for _ in range(3)]
        for stream in streams:
            next(stream)  # each stream is open and delivering
        too_many = call_error(lambda: next(iter(stub.WatchScoringJob(request, timeout=30))))
        assert (too_many.code, too_many.reason) == (EXHAUSTED, "TOO_MANY_WATCH_STREAMS")
        assert too_many.retry_delay_seconds is not None
        assert too_many.retry_delay_seconds > 0
        assert _serving(probe)
        got = stub.GetScoringJob(pb.GetScoringJobRequest(job_id=busy.job_id), timeout=5).job
        assert got.state == pb.JOB_STATE_RUNNING
        assert "o2u_watch_streams 3.0" in running.scrape()

        for job in (busy, *queued):
            stub.CancelScoringJob(pb.CancelScoringJobRequest(job_id=job.job_id), timeout=5)
        for stream in streams:  # the streams end with the job's final state
            assert [r.event.state for r in stream][-1] == pb.JOB_STATE_CANCELLED


def test_a_vanished_watcher_frees_its_stream_slot(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, data_root: Path, digits_uri: str
) -> None:
    # Keepalive shortened from a minute to half a second, so the test need not wait for it.
    monkeypatch.setattr(app, "KEEPALIVE_TIME_MS", 500)
    monkeypatch.setattr(app, "KEEPALIVE_TIMEOUT_MS", 500)
    settings = test_settings(state_dir=tmp_path / "state", data_roots=[data_root], max_watch_streams=1)
    with running_server(settings) as running, running.channel() as channel:
        stub = Stub(channel)
        job = create_job(stub, digits_uri, config=SLOW_CONFIG)
        request = pb.WatchScoringJobRequest(job_id=job.job_id)
        proxy = ThrottledProxy(running.address, bytes_per_second=1e9)
        try:
            with grpc.insecure_channel(proxy.endpoint) as far:
                stream = iter(Stub(far).WatchScoringJob(request, timeout=120))
                next(stream)
                refused = call_error(lambda: next(iter(stub.WatchScoringJob(request, timeout=10))))
                assert refused.code == EXHAUSTED
                proxy.silent.set()  # the watcher's host vanishes: no FIN, no RST, no answers
                deadline = time.monotonic() + 15
                while "o2u_watch_streams 0.0" not in running.scrape():
                    assert time.monotonic() < deadline, "the vanished watcher still holds its slot"
                    time.sleep(0.1)
                assert next(iter(stub.WatchScoringJob(request, timeout=10))).event.sequence == 1
        finally:
            proxy.cut()
        stub.CancelScoringJob(pb.CancelScoringJobRequest(job_id=job.job_id), timeout=10)


def _limit_error(stub: Stub, uri: str) -> tuple[grpc.StatusCode, str]:
    """The code and message of a dataset refused at create, or of the job that failed loading it."""
    try:
        job = create_job(stub, uri)
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    job = wait_for_job(stub, job.job_id, timeout=60)
    assert job.state == pb.JOB_STATE_FAILED, pb.JobState.Name(job.state)
    return grpc.StatusCode(
        next(code for code in grpc.StatusCode if code.value[0] == job.error.code)
    ), job.error.message


def test_dataset_limits_are_named(start_server: Callable[..., RunningServer], data_root: Path) -> None:
    root = data_root / "limits"
    rng = np.random.default_rng(0)
    (root / "images" / "a").mkdir(parents=True)
    (root / "images" / "b").mkdir(parents=True)
    for index in range(2):
        for label in ("a", "b"):
            pixels = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)  # 1,600 pixels
            (root / "images" / label / f"{index}.png").write_bytes(png(pixels))
    np.savez(root / "many.npz", x=rng.normal(size=(150, 4)).astype(np.float32), y=np.arange(150) % 2)
    np.savez(root / "heavy.npz", x=rng.normal(size=(60, 400)).astype(np.float32), y=np.arange(60) % 2)
    running = start_server(max_samples=100, max_dataset_bytes=64 * 1024, max_image_pixels=1_000)
    with running.channel() as channel:
        stub = Stub(channel)
        for name, setting in [
            ("many.npz", "max_samples (O2U_MAX_SAMPLES)"),
            ("heavy.npz", "max_dataset_bytes (O2U_MAX_DATASET_BYTES)"),
            ("images", "max_image_pixels (O2U_MAX_IMAGE_PIXELS)"),
        ]:
            code, message = _limit_error(stub, (root / name).as_uri())
            assert code == EXHAUSTED, (name, message)
            assert setting in message, message
        assert _serving(channel)


def test_a_job_of_too_many_epochs_is_refused_at_submission_or_fails_once_resolved(
    start_server: Callable[..., RunningServer], digits_uri: str
) -> None:
    """max_epochs_per_job bounds how long one caller holds a worker: epochs the config names are
    refused before the job is stored, the defaults chosen for the data fail the job once read."""
    running = start_server(max_epochs_per_job=40)
    with running.channel() as channel:
        stub = Stub(channel)
        explicit = {"cycle_length_epochs": 5, "num_cycles": 3, "clean_retraining": True}  # 15 x 3
        refused = call_error(lambda: create_job(stub, digits_uri, config=explicit))
        assert (refused.code, refused.reason) == (EXHAUSTED, "TOO_MANY_EPOCHS")
        assert "at least 45 training epochs" in refused.message
        assert "max_epochs_per_job (O2U_MAX_EPOCHS_PER_JOB) = 40" in refused.message
        resolved = {"num_cycles": 8}  # with the defaults' pretraining and cycle length, more than 40
        job = wait_for_job(stub, create_job(stub, digits_uri, config=resolved).job_id)
        assert job.state == pb.JOB_STATE_FAILED
        assert (job.error.code, job.error.reason) == (EXHAUSTED.value[0], "TOO_MANY_EPOCHS")
        assert "the job would train" in job.error.message
        fits = create_job(
            stub, digits_uri, config={"pretrain_epochs": 4, "cycle_length_epochs": 2, "num_cycles": 2}
        )
        assert wait_for_job(stub, fits.job_id).state == pb.JOB_STATE_SUCCEEDED


def _oom_after(failures: int) -> Callable[[str, int], None]:
    """A fault hook that raises a device out-of-memory error on its first `failures` calls."""
    calls = [0]

    def hook(stage: str, batch_size: int) -> None:
        calls[0] += 1
        if calls[0] <= failures:
            raise torch.OutOfMemoryError(f"injected: {stage} batch of {batch_size}")

    return hook


@pytest.mark.parametrize(("failures", "final"), [(2, pb.JOB_STATE_SUCCEEDED), (10**9, pb.JOB_STATE_FAILED)])
def test_device_out_of_memory(
    tmp_path: Path, data_root: Path, digits_uri: str, failures: int, final: int
) -> None:
    engine = Engine(score_noise=functools.partial(o2u_engine.score_noise, _fault_hook=_oom_after(failures)))
    settings = test_settings(state_dir=tmp_path / "state", data_roots=[data_root])
    with running_server(settings, engine=engine) as running, running.channel() as channel:
        stub = Stub(channel)
        job = wait_for_job(stub, create_job(stub, digits_uri).job_id, timeout=120)
        assert job.state == final, job.error
        if final == pb.JOB_STATE_FAILED:
            assert job.error.code == EXHAUSTED.value[0]
            assert job.error.reason == "DEVICE_OUT_OF_MEMORY"
            assert "batch size" in job.error.message
        else:
            scores = stub.ListNoiseScores(pb.ListNoiseScoresRequest(job_id=job.job_id), timeout=10)
            assert scores.total_size == job.run_info.num_samples
        assert _serving(channel)
        assert 'o2u_jobs_finished_total{state="' in running.scrape()
