"""TLS credentials and bearer-token authentication, against a small real grpc.aio server.

The server here registers only the health service and a canned ScoringService (one unary and one
server-streaming method), so the TLS credentials of `o2u_server.api.security` and the interceptor the
server installs for tokens (`o2u_server.api.tenancy.principal_interceptors`, here with the single
token file) are tested on their own: handshakes with trusted, untrusted and missing certificates,
and calls with missing, malformed, wrong and right tokens.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from o2u.v1 import scoring_pb2, scoring_pb2_grpc
from o2u_server.api.security import (
    SecurityConfigError,
    check_security_files,
    read_token_file,
    server_credentials,
)
from o2u_server.api.tenancy import principal_interceptors
from o2u_server.settings import Settings
from tests.o2u_server.tls_material import Pki, make_pki, write_encrypted_key

TOKEN = "s3cr3t-token_0123456789"
TIMEOUT = 10.0


async def _get_job(
    request: scoring_pb2.GetScoringJobRequest, context: object
) -> scoring_pb2.GetScoringJobResponse:
    return scoring_pb2.GetScoringJobResponse(job=scoring_pb2.ScoringJob(job_id=request.job_id))


async def _watch_job(
    request: scoring_pb2.WatchScoringJobRequest, context: object
) -> AsyncIterator[scoring_pb2.WatchScoringJobResponse]:
    for sequence in (1, 2):
        yield scoring_pb2.WatchScoringJobResponse(event=scoring_pb2.JobEvent(sequence=sequence))


# A canned ScoringService with one unary and one server-streaming method.
_CANNED_SCORING = grpc.method_handlers_generic_handler(
    "o2u.v1.ScoringService",
    {
        "GetScoringJob": grpc.unary_unary_rpc_method_handler(
            _get_job,
            request_deserializer=scoring_pb2.GetScoringJobRequest.FromString,
            response_serializer=scoring_pb2.GetScoringJobResponse.SerializeToString,
        ),
        "WatchScoringJob": grpc.unary_stream_rpc_method_handler(
            _watch_job,
            request_deserializer=scoring_pb2.WatchScoringJobRequest.FromString,
            response_serializer=scoring_pb2.WatchScoringJobResponse.SerializeToString,
        ),
    },
)


@contextmanager
def serve(
    credentials: grpc.ServerCredentials | None, interceptors: Sequence[grpc.aio.ServerInterceptor[Any, Any]]
) -> Iterator[int]:
    """Run a grpc.aio server on its own event loop thread; yield its loopback port."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(interceptors=interceptors)
        health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        server.add_generic_rpc_handlers((_CANNED_SCORING,))
        address = "127.0.0.1:0"
        port = (
            server.add_insecure_port(address)
            if credentials is None
            else server.add_secure_port(address, credentials)
        )
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(TIMEOUT)
    try:
        yield port
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(TIMEOUT)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(TIMEOUT)
        loop.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")  # secrets mounted from files often end in a newline
    return path


def _get(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> str:
    stub = scoring_pb2_grpc.ScoringServiceStub(channel)
    response = stub.GetScoringJob(
        scoring_pb2.GetScoringJobRequest(job_id="job-1"), metadata=metadata, timeout=TIMEOUT
    )
    return str(response.job.job_id)


def _health(channel: grpc.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return int(stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT).status)


def _error_reason(error: grpc.RpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "the error carries no google.rpc.Status"
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            assert info.domain == "o2u.dev"
            return str(info.reason)
    raise AssertionError("no ErrorInfo in the status details")


def _tls_channel(port: int, pki: Pki, *, root: str = "ca_cert", client: str | None = None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.read(root),
        private_key=pki.read(f"{client}_key") if client else None,
        certificate_chain=pki.read(f"{client}_cert") if client else None,
    )
    return grpc.secure_channel(f"127.0.0.1:{port}", credentials)


# ---------------------------------------------------------------------------------------------------
# server_credentials: configuration errors name the setting and the file
# ---------------------------------------------------------------------------------------------------


def test_no_tls_settings_means_plaintext() -> None:
    assert server_credentials(Settings()) is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"tls_cert_file": "server_cert"}, "O2U_TLS_KEY_FILE is not set"),
        ({"tls_key_file": "server_key"}, "O2U_TLS_CERT_FILE is not set"),
        ({"tls_client_ca_file": "ca_cert"}, "mutual TLS needs a server certificate"),
        ({"tls_cert_file": "server_cert", "tls_key_file": "client_key"}, "matching private key"),
        ({"tls_cert_file": "server_key", "tls_key_file": "server_key"}, "matching private key"),
    ],
)
def test_inconsistent_tls_settings_are_refused(pki: Pki, fields: dict[str, str], message: str) -> None:
    settings = Settings(**{name: getattr(pki, attribute) for name, attribute in fields.items()})
    with pytest.raises(SecurityConfigError, match=message):
        server_credentials(settings)


def test_missing_unreadable_and_non_pem_files_are_named(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(SecurityConfigError, match=r"O2U_TLS_CERT_FILE: file '.*nope\.pem' does not exist"):
        server_credentials(Settings(tls_cert_file=missing, tls_key_file=pki.server_key))
    with pytest.raises(SecurityConfigError, match=r"O2U_TLS_KEY_FILE: .* is a directory"):
        server_credentials(Settings(tls_cert_file=pki.server_cert, tls_key_file=tmp_path))
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"\x00\x01 not a certificate")
    with pytest.raises(SecurityConfigError, match=r"O2U_TLS_CLIENT_CA_FILE: .* is not PEM"):
        server_credentials(
            Settings(tls_cert_file=pki.server_cert, tls_key_file=pki.server_key, tls_client_ca_file=garbage)
        )
    fake_ca = tmp_path / "fake-ca.pem"
    fake_ca.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(SecurityConfigError, match=r"O2U_TLS_CLIENT_CA_FILE: .* holds no valid CA"):
        server_credentials(
            Settings(tls_cert_file=pki.server_cert, tls_key_file=pki.server_key, tls_client_ca_file=fake_ca)
        )


def test_encrypted_private_key_is_refused(pki: Pki, tmp_path: Path) -> None:
    encrypted = write_encrypted_key(tmp_path / "encrypted-key.pem")
    with pytest.raises(SecurityConfigError, match="encrypted"):
        server_credentials(Settings(tls_cert_file=pki.server_cert, tls_key_file=encrypted))


# ---------------------------------------------------------------------------------------------------
# TLS and mutual TLS handshakes
# ---------------------------------------------------------------------------------------------------


def test_tls_server_accepts_trusting_client_and_refuses_plaintext_and_wrong_ca(pki: Pki) -> None:
    credentials = server_credentials(Settings(tls_cert_file=pki.server_cert, tls_key_file=pki.server_key))
    assert credentials is not None
    with serve(credentials, []) as port:
        with _tls_channel(port, pki) as channel:
            assert _get(channel) == "job-1"
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError) as plaintext:
            _health(channel)
        assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE
        with (
            _tls_channel(port, pki, root="other_ca_cert") as channel,
            pytest.raises(grpc.RpcError) as wrong_ca,
        ):
            _get(channel)
        assert wrong_ca.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_requires_a_client_certificate_from_the_configured_ca(pki: Pki) -> None:
    settings = Settings(
        tls_cert_file=pki.server_cert, tls_key_file=pki.server_key, tls_client_ca_file=pki.ca_cert
    )
    with serve(server_credentials(settings), []) as port:
        with _tls_channel(port, pki, client="client") as channel:
            assert _get(channel) == "job-1"
            assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
        for client in (None, "other_client"):
            with _tls_channel(port, pki, client=client) as channel, pytest.raises(grpc.RpcError) as refused:
                _get(channel)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, client


# ---------------------------------------------------------------------------------------------------
# Bearer tokens
# ---------------------------------------------------------------------------------------------------


def test_read_token_file_strips_and_validates(tmp_path: Path, token_file: Path) -> None:
    assert read_token_file(token_file) == TOKEN
    empty = tmp_path / "empty"
    empty.write_text(" \n")
    with pytest.raises(SecurityConfigError, match=r"O2U_AUTH_TOKEN_FILE: .* is empty"):
        read_token_file(empty)
    spaced = tmp_path / "spaced"
    spaced.write_text("two words\n")
    with pytest.raises(SecurityConfigError, match="visible ASCII"):
        read_token_file(spaced)
    with pytest.raises(SecurityConfigError, match="does not exist"):
        read_token_file(tmp_path / "absent")


def test_no_token_file_means_no_interceptor() -> None:
    assert principal_interceptors(Settings()) == []


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ((), "MISSING_CREDENTIALS"),
        ((("authorization", TOKEN),), "MISSING_CREDENTIALS"),  # no scheme
        ((("authorization", f"Basic {TOKEN}"),), "MISSING_CREDENTIALS"),
        ((("authorization", "Bearer "),), "MISSING_CREDENTIALS"),
        ((("authorization", f"Bearer {TOKEN}"), ("authorization", f"Bearer {TOKEN}")), "MISSING_CREDENTIALS"),
        ((("authorization", "Bearer wrong"),), "INVALID_CREDENTIALS"),
        ((("authorization", f"Bearer {TOKEN[:-1]}"),), "INVALID_CREDENTIALS"),  # a prefix of the token
        ((("authorization", f"Bearer {TOKEN}x"),), "INVALID_CREDENTIALS"),
        ((("authorization", f"Bearer {TOKEN.upper()}"),), "INVALID_CREDENTIALS"),
        ((("authorization", "Bearer " + "a" * 4097),), "INVALID_CREDENTIALS"),
    ],
)
def test_calls_without_the_right_token_are_unauthenticated(
    token_file: Path, metadata: tuple[tuple[str, str], ...], reason: str
) -> None:
    with (
        serve(None, principal_interceptors(Settings(auth_token_file=token_file))) as port,
        grpc.insecure_channel(f"127.0.0.1:{port}") as channel,
    ):
        with pytest.raises(grpc.RpcError) as unary:
            _get(channel, metadata)
        assert unary.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert _error_reason(unary.value) == reason
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        stream = stub.WatchScoringJob(
            scoring_pb2.WatchScoringJobRequest(job_id="job-1"), metadata=metadata, timeout=TIMEOUT
        )
        with pytest.raises(grpc.RpcError) as streaming:
            list(stream)
        assert streaming.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert _error_reason(streaming.value) == reason
        # Health needs no token, so probes keep working.
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING


def test_right_token_is_accepted_for_unary_and_streaming_calls(token_file: Path) -> None:
    with (
        serve(None, principal_interceptors(Settings(auth_token_file=token_file))) as port,
        grpc.insecure_channel(f"127.0.0.1:{port}") as channel,
    ):
        for scheme in ("Bearer", "bearer"):
            metadata = (("authorization", f"{scheme} {TOKEN}"),)
            assert _get(channel, metadata) == "job-1"
            stub = scoring_pb2_grpc.ScoringServiceStub(channel)
            request = scoring_pb2.WatchScoringJobRequest(job_id="job-1")
            events = list(stub.WatchScoringJob(request, metadata=metadata, timeout=TIMEOUT))
            assert [response.event.sequence for response in events] == [1, 2]


def test_unauthenticated_payload_is_never_parsed_and_unknown_methods_stay_hidden(token_file: Path) -> None:
    with (
        serve(None, principal_interceptors(Settings(auth_token_file=token_file))) as port,
        grpc.insecure_channel(f"127.0.0.1:{port}") as channel,
    ):
        raw = channel.unary_unary("/o2u.v1.ScoringService/GetScoringJob", None, None)
        with pytest.raises(grpc.RpcError) as garbage:
            raw(b"\xff\xff\xff not a protobuf", timeout=TIMEOUT)
        assert garbage.value.code() == grpc.StatusCode.UNAUTHENTICATED
        unknown = channel.unary_unary("/o2u.v1.ScoringService/NoSuchMethod", None, None)
        with pytest.raises(grpc.RpcError) as hidden:
            unknown(b"", timeout=TIMEOUT)
        assert hidden.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as authenticated:
            unknown(b"", metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=TIMEOUT)
        assert authenticated.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_token_over_mutual_tls(pki: Pki, token_file: Path) -> None:
    settings = Settings(
        tls_cert_file=pki.server_cert,
        tls_key_file=pki.server_key,
        tls_client_ca_file=pki.ca_cert,
        auth_token_file=token_file,
    )
    with (
        serve(server_credentials(settings), principal_interceptors(settings)) as port,
        _tls_channel(port, pki, client="client") as channel,
    ):
        assert _get(channel, (("authorization", f"Bearer {TOKEN}"),)) == "job-1"
        with pytest.raises(grpc.RpcError) as refused:
            _get(channel)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_check_security_files_reads_everything_up_front(pki: Pki, tmp_path: Path, token_file: Path) -> None:
    good = Settings(tls_cert_file=pki.server_cert, tls_key_file=pki.server_key, auth_token_file=token_file)
    check_security_files(good)
    empty = tmp_path / "empty-token"
    empty.write_text("")
    with pytest.raises(SecurityConfigError, match="O2U_AUTH_TOKEN_FILE"):
        check_security_files(Settings(auth_token_file=empty))
    with pytest.raises(SecurityConfigError, match="O2U_TLS_KEY_FILE"):
        check_security_files(Settings(tls_cert_file=pki.server_cert, auth_token_file=token_file))
