"""/metrics scraped over HTTP and checked against what the test did to a fresh server."""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from o2u.v1 import scoring_pb2 as pb
from o2u.v1 import scoring_pb2_grpc
from tests.server_testing import DIGITS_SAMPLES, TINY_CONFIG, RunningServer, call_error, create_job

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _samples(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_what_happened(start_server: Callable[..., RunningServer], digits_uri: str) -> None:
    running = start_server()
    with running.channel() as channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        for _ in range(2):
            call_error(lambda: stub.GetScoringJob(pb.GetScoringJobRequest(job_id=f"job-{uuid.uuid4().hex}")))
        call_error(lambda: stub.GetScoringJob(pb.GetScoringJobRequest(job_id="nope")))
        job = create_job(stub, digits_uri)
        events = list(stub.WatchScoringJob(pb.WatchScoringJobRequest(job_id=job.job_id)))
        assert events[-1].event.state == pb.JOB_STATE_SUCCEEDED
        stub.ListNoiseScores(pb.ListNoiseScoresRequest(job_id=job.job_id))
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        samples = _samples(running.scrape())

    def requests(method: str, code: str) -> float:
        return _value(samples, "o2u_grpc_requests_total", method=method, code=code)

    assert requests("GetScoringJob", "NOT_FOUND") == 2
    assert requests("GetScoringJob", "INVALID_ARGUMENT") == 1
    assert requests("CreateScoringJob", "OK") == 1
    assert requests("WatchScoringJob", "OK") == 1
    assert requests("ListNoiseScores", "OK") == 1
    assert requests("Check", "OK") == 1
    assert _value(samples, "o2u_grpc_request_duration_seconds_count", method="GetScoringJob") == 3
    assert _value(samples, "o2u_grpc_request_duration_seconds_count", method="WatchScoringJob") == 1

    assert _value(samples, "o2u_jobs_finished_total", state="succeeded") == 1
    assert _value(samples, "o2u_jobs_finished_total", state="failed") == 0
    assert _value(samples, "o2u_job_duration_seconds_count", state="succeeded") == 1
    assert _value(samples, "o2u_jobs_queued") == 0
    assert _value(samples, "o2u_jobs_running") == 0
    assert _value(samples, "o2u_watch_streams") == 0
    assert _value(samples, "o2u_samples_scored_total") == DIGITS_SAMPLES
    pretrain, cycle = (
        TINY_CONFIG["pretrain_epochs"],
        TINY_CONFIG["cycle_length_epochs"] * TINY_CONFIG["num_cycles"],
    )
    assert _value(samples, "o2u_epoch_duration_seconds_count", stage="pretraining") == pretrain
    assert _value(samples, "o2u_epoch_duration_seconds_count", stage="cyclic") == cycle
    assert _value(samples, "o2u_training_samples_total", stage="cyclic") == cycle * DIGITS_SAMPLES
    assert _value(samples, "o2u_training_samples_per_second") > 0
    assert _value(samples, "o2u_dataset_bytes_read_total", source="file") > 0
    build = [key for key in samples if key[0] == "o2u_build_info"]
    assert len(build) == 1
    assert dict(build[0][1])["device"] == "cpu"
    assert _value(samples, "process_resident_memory_bytes") > 0


def test_each_server_has_its_own_registry(
    start_server: Callable[..., RunningServer], digits_uri: str
) -> None:
    first, second = start_server(), start_server()
    with first.channel() as channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        call_error(lambda: stub.GetScoringJob(pb.GetScoringJobRequest(job_id="x")))
    assert first.metrics_port != second.metrics_port
    assert 'o2u_grpc_requests_total{code="INVALID_ARGUMENT",method="GetScoringJob"} 1.0' in first.scrape()
    assert "INVALID_ARGUMENT" not in second.scrape()


def test_queue_gauges_follow_the_jobs(start_server: Callable[..., RunningServer], digits_uri: str) -> None:
    running = start_server()
    with running.channel() as channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        slow = create_job(stub, digits_uri, config={**TINY_CONFIG, "pretrain_epochs": 10_000})
        queued = [create_job(stub, digits_uri) for _ in range(2)]
        samples = _samples(running.scrape())
        assert _value(samples, "o2u_jobs_queued") + _value(samples, "o2u_jobs_running") == 3
        for job in [*queued, slow]:
            stub.CancelScoringJob(pb.CancelScoringJobRequest(job_id=job.job_id))
        for job in [*queued, slow]:
            list(stub.WatchScoringJob(pb.WatchScoringJobRequest(job_id=job.job_id)))
        samples = _samples(running.scrape())
    assert _value(samples, "o2u_jobs_finished_total", state="cancelled") == 3
    assert _value(samples, "o2u_jobs_queued") == _value(samples, "o2u_jobs_running") == 0


def test_refused_and_aborted_calls_are_counted_by_code(
    start_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    running = start_server(auth_token_file=token_file)
    with running.channel() as channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        refused = call_error(lambda: stub.ListScoringJobs(pb.ListScoringJobsRequest()))
        assert refused.code is grpc.StatusCode.UNAUTHENTICATED
        listed = stub.ListScoringJobs(
            pb.ListScoringJobsRequest(), metadata=[("authorization", "Bearer s3cret-token")]
        )
        assert list(listed.jobs) == []
        health = health_pb2_grpc.HealthStub(channel)  # open without a token, for probes
        unknown = call_error(lambda: health.Check(health_pb2.HealthCheckRequest(service="nope")))
        assert unknown.code is grpc.StatusCode.NOT_FOUND
        samples = _samples(running.scrape())
    assert _value(samples, "o2u_grpc_requests_total", method="ListScoringJobs", code="UNAUTHENTICATED") == 1
    assert _value(samples, "o2u_grpc_requests_total", method="ListScoringJobs", code="OK") == 1
    assert _value(samples, "o2u_grpc_requests_total", method="Check", code="NOT_FOUND") == 1


def test_made_up_method_names_share_one_label_value(
    start_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    running = start_server(auth_token_file=token_file)
    size_before = len(running.scrape())
    with running.channel() as channel:
        for index in range(300):  # a stranger probing for methods, without a token
            invented = channel.unary_unary(f"/o2u.v1.ScoringService/Probe{index}", None, None)
            error = call_error(functools.partial(invented, b"", timeout=10))
            assert error.code is grpc.StatusCode.UNAUTHENTICATED
        other = channel.unary_unary("/evil.Service/Check", None, None)  # a known short name elsewhere
        call_error(lambda: other(b"", timeout=10))
        # A call is counted just after its status is sent: wait for the last one to be counted.
        deadline = time.monotonic() + 10
        while (
            _value(
                samples := _samples(running.scrape()),
                "o2u_grpc_requests_total",
                method="unknown",
                code="UNAUTHENTICATED",
            )
            < 301
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)
    methods = {dict(labels).get("method") for name, labels in samples if name == "o2u_grpc_requests_total"}
    known = set(pb.DESCRIPTOR.services_by_name["ScoringService"].methods_by_name) | {
        "Check",
        "Watch",
        "unknown",
    }
    assert methods <= known, methods - known
    assert _value(samples, "o2u_grpc_requests_total", method="unknown", code="UNAUTHENTICATED") == 301
    assert len(running.scrape()) < size_before + 5_000  # two series more, not 300
