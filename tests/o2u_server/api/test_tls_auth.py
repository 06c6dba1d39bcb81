"""TLS, mutual TLS and bearer tokens on the real server: who gets in, who does not, and what they see.

Certificates are made at test time (tests/o2u_server/tls_material.py). Every refusal is checked with
a raw gRPC channel, so it is the server, not a client library, that decides; one test goes through
the Python client to show the same settings work end to end.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from o2u.v1 import scoring_pb2 as pb
from o2u.v1 import scoring_pb2_grpc
from o2u_client import Client, UnauthenticatedError
from o2u_server.api.security import SecurityConfigError
from tests.o2u_server.tls_material import Pki, make_pki
from tests.server_testing import RunningServer, call_error, running_server, test_settings

TOKEN = "Zm9vYmFyLXRva2VuLTAxMjM0NTY3ODk"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
TIMEOUT = 10.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secrets") / "token"
    path.write_text(TOKEN + "\n")
    return path


def _serve(tmp_path_factory: pytest.TempPathFactory, data_root: Path, **security: Any) -> Any:
    settings = test_settings(state_dir=tmp_path_factory.mktemp("state"), data_roots=[data_root], **security)
    return running_server(settings)


def _tls_channel(
    server: RunningServer, pki: Pki, *, root: Path | None = None, client: bool = False
) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(root or pki.ca_cert).read_bytes(),
        private_key=pki.client_key.read_bytes() if client else None,
        certificate_chain=pki.client_cert.read_bytes() if client else None,
    )
    return grpc.secure_channel(server.address, credentials)


def _list_jobs(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> list[pb.ScoringJob]:
    stub = scoring_pb2_grpc.ScoringServiceStub(channel)
    return list(stub.ListScoringJobs(pb.ListScoringJobsRequest(), metadata=metadata, timeout=TIMEOUT).jobs)


def _health(channel: grpc.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return int(
        stub.Check(health_pb2.HealthCheckRequest(service="o2u.v1.ScoringService"), timeout=TIMEOUT).status
    )


@pytest.fixture(scope="module")
def tls_server(
    tmp_path_factory: pytest.TempPathFactory, data_root: Path, pki: Pki, token_file: Path
) -> Iterator[RunningServer]:
    """TLS (server certificate only) plus a bearer token."""
    with _serve(
        tmp_path_factory,
        data_root,
        tls_cert_file=pki.server_cert,
        tls_key_file=pki.server_key,
        auth_token_file=token_file,
    ) as server:
        yield server


def test_tls_server_refuses_plaintext_and_clients_that_do_not_trust_it(
    tls_server: RunningServer, pki: Pki
) -> None:
    with _tls_channel(tls_server, pki) as channel:
        assert _list_jobs(channel, AUTH) == []
    with grpc.insecure_channel(tls_server.address) as plaintext:
        assert call_error(lambda: _health(plaintext)).code == grpc.StatusCode.UNAVAILABLE
        assert call_error(lambda: _list_jobs(plaintext, AUTH)).code == grpc.StatusCode.UNAVAILABLE
    with _tls_channel(tls_server, pki, root=pki.other_ca_cert) as untrusting:
        assert call_error(lambda: _list_jobs(untrusting, AUTH)).code == grpc.StatusCode.UNAVAILABLE
    with _tls_channel(tls_server, pki) as channel:
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING, "the server is unharmed"


def test_tokens_missing_wrong_and_right(tls_server: RunningServer, pki: Pki, data_root: Path) -> None:
    with _tls_channel(tls_server, pki) as channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        missing = call_error(lambda: _list_jobs(channel))
        assert (missing.code, missing.reason) == (grpc.StatusCode.UNAUTHENTICATED, "MISSING_CREDENTIALS")
        wrong = call_error(lambda: _list_jobs(channel, (("authorization", f"Bearer {TOKEN[:-1]}"),)))
        assert (wrong.code, wrong.reason) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS")
        # A refused create leaves nothing behind; a refused stream never opens.
        create = pb.CreateScoringJobRequest(dataset=pb.DatasetRef(uri=(data_root / "digits.npz").as_uri()))
        refused = call_error(lambda: stub.CreateScoringJob(create, metadata=(("authorization", "Bearer x"),)))
        assert refused.code == grpc.StatusCode.UNAUTHENTICATED
        watch = pb.WatchScoringJobRequest(job_id="job-" + "0" * 32)
        streaming = call_error(lambda: list(stub.WatchScoringJob(watch, timeout=TIMEOUT)))
        assert streaming.code == grpc.StatusCode.UNAUTHENTICATED
        assert _list_jobs(channel, AUTH) == []
        # With the token, the call reaches the service (which answers NOT_FOUND for an unknown job).
        known = call_error(lambda: list(stub.WatchScoringJob(watch, metadata=AUTH, timeout=TIMEOUT)))
        assert known.code == grpc.StatusCode.NOT_FOUND
        # Health and reflection need no token.
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        answers = list(reflection.ServerReflectionInfo(iter([request]), timeout=TIMEOUT))
        services = {service.name for service in answers[0].list_services_response.service}
        assert "o2u.v1.ScoringService" in services
    metrics = tls_server.scrape()
    assert 'o2u_grpc_requests_total{code="UNAUTHENTICATED",method="ListScoringJobs"}' in metrics


def test_python_client_over_tls_with_a_token(tls_server: RunningServer, pki: Pki, token_file: Path) -> None:
    with Client(tls_server.address, root_certificates=pki.ca_cert, token_file=token_file) as client:
        assert client.healthy()
        assert list(client.list()) == []
    with (
        Client(tls_server.address, root_certificates=pki.ca_cert) as anonymous,
        pytest.raises(UnauthenticatedError),
    ):
        list(anonymous.list())


def test_mutual_tls_refuses_clients_without_an_accepted_certificate(
    tmp_path_factory: pytest.TempPathFactory, data_root: Path, pki: Pki
) -> None:
    with _serve(
        tmp_path_factory,
        data_root,
        tls_cert_file=pki.server_cert,
        tls_key_file=pki.server_key,
        tls_client_ca_file=pki.ca_cert,
    ) as server:
        with _tls_channel(server, pki, client=True) as channel:
            assert _list_jobs(channel) == []
            assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
        with _tls_channel(server, pki) as no_certificate:
            assert call_error(lambda: _health(no_certificate)).code == grpc.StatusCode.UNAVAILABLE
        stranger = grpc.ssl_channel_credentials(
            root_certificates=pki.ca_cert.read_bytes(),
            private_key=pki.other_client_key.read_bytes(),
            certificate_chain=pki.other_client_cert.read_bytes(),
        )
        with grpc.secure_channel(server.address, stranger) as channel:
            assert call_error(lambda: _list_jobs(channel)).code == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(server.address) as plaintext:
            assert call_error(lambda: _health(plaintext)).code == grpc.StatusCode.UNAVAILABLE


def test_server_does_not_start_with_unusable_security_files(
    tmp_path_factory: pytest.TempPathFactory, data_root: Path, pki: Pki, tmp_path: Path
) -> None:
    with (
        pytest.raises(SecurityConfigError, match=r"O2U_TLS_KEY_FILE: file .* does not exist"),
        _serve(
            tmp_path_factory, data_root, tls_cert_file=pki.server_cert, tls_key_file=tmp_path / "absent.pem"
        ),
    ):
        pass
    empty = tmp_path / "token"
    empty.write_text("\n")
    with (
        pytest.raises(SecurityConfigError, match=r"O2U_AUTH_TOKEN_FILE: .* is empty"),
        _serve(tmp_path_factory, data_root, auth_token_file=empty),
    ):
        pass


def test_o2u_server_exits_at_once_naming_a_bad_secret(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "O2U_TLS_CERT_FILE": str(tmp_path / "absent.pem"),
        "O2U_TLS_KEY_FILE": str(tmp_path / "absent-key.pem"),
        "O2U_STATE_DIR": str(tmp_path / "state"),
        "O2U_LISTEN_ADDRESS": "127.0.0.1:0",
        "O2U_METRICS_PORT": "0",
    }
    command = [sys.executable, "-m", "o2u_server.main"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert "O2U_TLS_CERT_FILE" in result.stderr
    assert "does not exist" in result.stderr
    assert not (tmp_path / "state").exists(), "nothing was started"
