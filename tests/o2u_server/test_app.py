"""The assembled server: health, reflection, the healthcheck command, draining and the state lock."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from o2u.v1 import scoring_pb2 as pb
from o2u.v1 import scoring_pb2_grpc
from o2u_server import healthcheck
from o2u_server.app import O2UServer
from o2u_server.jobs.database import StateDirLockedError
from o2u_server.jobs.store import Recovery
from tests.server_testing import (
    SLOW_CONFIG,
    RunningServer,
    call_error,
    create_job,
    running_server,
    test_settings,
    wait_for_job,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.parametrize("service", ["", "o2u.v1.ScoringService"])
def test_health_is_serving_once_started(channel: grpc.Channel, service: str) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == SERVING


def test_health_of_an_unknown_service_is_not_found(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    error = call_error(lambda: health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5))
    assert error.code is grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="o2u.v1.ScoringService"),
    ]
    listed, described = list(stub.ServerReflectionInfo(iter(requests), timeout=10))
    names = {service.name for service in listed.list_services_response.service}
    assert {
        "o2u.v1.ScoringService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names
    assert described.file_descriptor_response.file_descriptor_proto  # the scoring.proto descriptor


def test_healthcheck_command(server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert healthcheck.main(["--address", server.address, "--timeout", "5"]) == 0
    assert "SERVING" in capsys.readouterr().out
    assert healthcheck.main(["--address", server.address, "--service", "o2u.v1.ScoringService"]) == 0


def test_healthcheck_command_fails_without_a_server(capsys: pytest.CaptureFixture[str]) -> None:
    assert healthcheck.main(["--address", "127.0.0.1:1", "--timeout", "1"]) == 1
    assert "health check failed" in capsys.readouterr().err


def test_healthcheck_names_what_to_set_when_the_ca_file_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A TLS Secret made by `kubectl create secret tls` has no ca.crt, which the chart's probes name
    by default: the probe's output (in the pod's events) says which value to set."""
    missing = tmp_path / "ca.crt"
    assert healthcheck.main(["--address", "127.0.0.1:1", "--ca", str(missing), "--timeout", "1"]) == 1
    assert capsys.readouterr().err.strip() == (
        f"health check failed: --ca {missing} does not exist; with the Helm chart, tls.caKey names "
        "the CA's key in the TLS Secret (empty: the system roots)"
    )


def test_build_info_and_process_metrics_are_exported(server: RunningServer) -> None:
    text = server.scrape()
    assert 'o2u_build_info{device="cpu"' in text
    assert "process_cpu_seconds_total" in text
    assert "python_info" in text


def test_draining_refuses_jobs_and_ends_watch_streams(
    start_server: Callable[..., RunningServer], digits_uri: str
) -> None:
    running = start_server()
    with running.channel() as channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        job = create_job(stub, digits_uri, config=SLOW_CONFIG)
        wait_for_job(stub, job.job_id, states=(pb.JOB_STATE_RUNNING,))
        watch = stub.WatchScoringJob(pb.WatchScoringJobRequest(job_id=job.job_id), timeout=60)
        assert next(watch).event.sequence == 1
        running.run(running.server.drain)

        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == NOT_SERVING
        refused = call_error(lambda: create_job(stub, digits_uri))
        assert refused.code is grpc.StatusCode.UNAVAILABLE
        assert refused.reason == "SERVER_SHUTTING_DOWN"
        assert refused.retry_delay_seconds is not None
        ended = call_error(lambda: list(watch))
        assert ended.code is grpc.StatusCode.UNAVAILABLE
        assert "after_sequence=" in ended.message


def test_a_second_server_cannot_share_a_state_dir(
    start_server: Callable[..., RunningServer], data_root: Path, tmp_path: Path
) -> None:
    first = start_server(state_dir=tmp_path / "state")
    with pytest.raises(StateDirLockedError, match="another o2u-server"), running_server(first.settings):
        pass


def test_not_serving_until_the_store_is_open(
    monkeypatch: pytest.MonkeyPatch, data_root: Path, tmp_path: Path, digits_uri: str
) -> None:
    opening, release, stop = threading.Event(), threading.Event(), threading.Event()
    open_store = O2UServer._open_store

    def slow_open(self: O2UServer) -> tuple[Recovery, bytes]:
        opening.set()
        release.wait(30)
        return open_store(self)

    monkeypatch.setattr(O2UServer, "_open_store", slow_open)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = test_settings(
        state_dir=tmp_path / "state", data_roots=[data_root], listen_address=f"127.0.0.1:{port}"
    )

    def serve() -> None:
        with running_server(settings):
            stop.wait(60)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        assert opening.wait(30)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service="o2u.v1.ScoringService")
            assert health.Check(request, timeout=10, wait_for_ready=True).status == NOT_SERVING
            stub = scoring_pb2_grpc.ScoringServiceStub(channel)
            early = call_error(lambda: create_job(stub, digits_uri))
            assert (early.code, early.reason) == (grpc.StatusCode.UNAVAILABLE, "SERVER_STARTING")
            release.set()
            deadline = time.monotonic() + 30
            while health.Check(request, timeout=10).status != SERVING:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            create_job(stub, digits_uri)
    finally:
        release.set()
        stop.set()
        thread.join(60)
