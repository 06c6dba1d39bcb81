"""Tenants on the real server: two principals and an admin, over bearer tokens and over mutual TLS.

Each principal sees, watches, lists, exports, cancels and deletes only its own jobs (another's job is
NOT_FOUND with the message a missing id gets), a request_id names one job per principal, the admin
sees every job, and a principal over its quota is RESOURCE_EXHAUSTED with a QuotaFailure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from o2u.v1 import scoring_pb2 as pb
from o2u.v1 import scoring_pb2_grpc
from o2u_server.api.security import SecurityConfigError
from o2u_server.api.tenancy import read_tokens_file
from tests.o2u_server.tls_material import TenantPki, make_tenant_pki
from tests.server_testing import (
    SLOW_CONFIG,
    TINY_CONFIG,
    RunningServer,
    call_error,
    rpc_error,
    running_server,
    test_settings,
    wait_for_job,
)

TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-9876543210", "root": "root-token-5555"}
MISSING = "job-" + "0" * 32

Stub = scoring_pb2_grpc.ScoringServiceStub


class Caller:
    """A stub whose every call carries one principal's token (or none, for mTLS channels)."""

    def __init__(self, channel: grpc.Channel, token: str | None = None) -> None:
        self.stub = Stub(channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.stub, name)
        return lambda request, **kw: method(request, metadata=self.metadata, timeout=60, **kw)


def _create(caller: Caller, uri: str, config: dict[str, Any], **fields: Any) -> pb.ScoringJob:
    request = pb.CreateScoringJobRequest(
        dataset=pb.DatasetRef(uri=uri), config=pb.ScoringConfig(**config), **fields
    )
    job: pb.ScoringJob = caller.CreateScoringJob(request).job
    return job


def _wait(caller: Caller, job_id: str) -> pb.ScoringJob:
    class Adapter:
        def GetScoringJob(self, request: Any, timeout: float) -> Any:  # noqa: N802 (gRPC name)
            return caller.GetScoringJob(request)

    return wait_for_job(Adapter(), job_id)  # type: ignore[arg-type]


def _not_found_like_missing(call: Callable[[str], object], job_id: str) -> None:
    """`call(job_id)` fails exactly as `call` of an id that does not exist (with the id swapped)."""
    other = call_error(lambda: call(job_id))
    missing = call_error(lambda: call(MISSING))
    assert other.code == grpc.StatusCode.NOT_FOUND, other
    assert other.message.replace(job_id, MISSING) == missing.message
    assert other.reason == missing.reason


def _isolation(alice: Caller, bob: Caller, admin: Caller, uri: str, exports: Path) -> None:
    """The checks both transports share: alice's job is invisible to bob, visible to the admin."""
    a = _create(alice, uri, TINY_CONFIG, request_id="same-request")
    b = _create(bob, uri, TINY_CONFIG, request_id="same-request")
    assert a.job_id != b.job_id, "a request_id names one job per principal"
    assert (a.owner, b.owner) == ("alice", "bob")
    assert _create(alice, uri, TINY_CONFIG, request_id="same-request").job_id == a.job_id, "a retry"
    assert _wait(alice, a.job_id).state == pb.JOB_STATE_SUCCEEDED
    assert _wait(bob, b.job_id).state == pb.JOB_STATE_SUCCEEDED
    job_id = a.job_id
    _not_found_like_missing(lambda j: bob.GetScoringJob(pb.GetScoringJobRequest(job_id=j)), job_id)
    _not_found_like_missing(lambda j: list(bob.WatchScoringJob(pb.WatchScoringJobRequest(job_id=j))), job_id)
    _not_found_like_missing(lambda j: bob.ListNoiseScores(pb.ListNoiseScoresRequest(job_id=j)), job_id)
    _not_found_like_missing(lambda j: bob.GetDatasetSummary(pb.GetDatasetSummaryRequest(job_id=j)), job_id)
    destination = (exports / f"bob-{job_id}.csv").as_uri()
    _not_found_like_missing(
        lambda j: bob.ExportNoiseScores(pb.ExportNoiseScoresRequest(job_id=j, destination_uri=destination)),
        job_id,
    )
    assert not (exports / f"bob-{job_id}.csv").exists()
    _not_found_like_missing(lambda j: bob.CancelScoringJob(pb.CancelScoringJobRequest(job_id=j)), job_id)
    _not_found_like_missing(lambda j: bob.DeleteScoringJob(pb.DeleteScoringJobRequest(job_id=j)), job_id)
    # The owner still has everything.
    assert alice.GetScoringJob(pb.GetScoringJobRequest(job_id=job_id)).job.state == pb.JOB_STATE_SUCCEEDED
    assert len(list(alice.WatchScoringJob(pb.WatchScoringJobRequest(job_id=job_id)))) >= 2
    assert alice.ListNoiseScores(pb.ListNoiseScoresRequest(job_id=job_id)).total_size > 0
    own = alice.ExportNoiseScores(pb.ExportNoiseScoresRequest(job_id=job_id, destination_uri=destination))
    assert own.rows_written > 0
    # Listings: own jobs only, whatever owner is asked for; the admin lists all or one owner's.
    listed: Callable[[Caller, str], list[str]] = lambda caller, owner: [  # noqa: E731
        job.job_id for job in caller.ListScoringJobs(pb.ListScoringJobsRequest(owner=owner)).jobs
    ]
    assert listed(alice, "") == [a.job_id]
    assert listed(bob, "") == [b.job_id]
    assert listed(bob, "alice") == [b.job_id]
    assert set(listed(admin, "")) == {a.job_id, b.job_id}
    assert listed(admin, "alice") == [a.job_id]
    assert admin.GetScoringJob(pb.GetScoringJobRequest(job_id=job_id)).job.owner == "alice"
    # The admin may delete anyone's job; then it is gone for its owner too.
    admin.DeleteScoringJob(pb.DeleteScoringJobRequest(job_id=b.job_id))
    assert call_error(lambda: bob.GetScoringJob(pb.GetScoringJobRequest(job_id=b.job_id))).code == (
        grpc.StatusCode.NOT_FOUND
    )
    alice.DeleteScoringJob(pb.DeleteScoringJobRequest(job_id=job_id))


def _quota(alice: Caller, bob: Caller, uri: str) -> None:
    """max_jobs_per_principal = 1: alice's second unfinished job is refused, bob is not affected."""
    slow = _create(alice, uri, SLOW_CONFIG)
    error = rpc_error(lambda: _create(alice, uri, TINY_CONFIG))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    assert "limit per principal is 1" in (error.details() or "")  # type: ignore[attr-defined]
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    kinds: dict[str, Any] = {}
    for packed in status.details:
        for kind in (error_details_pb2.QuotaFailure, error_details_pb2.ErrorInfo):
            if packed.Is(kind.DESCRIPTOR):
                kinds[kind.__name__] = kind()
                packed.Unpack(kinds[kind.__name__])
    assert kinds["ErrorInfo"].reason == "PRINCIPAL_QUOTA_EXCEEDED"
    assert kinds["ErrorInfo"].metadata["limit"] == "1"
    assert [v.subject for v in kinds["QuotaFailure"].violations] == ["principal:alice"]
    other = _create(bob, uri, SLOW_CONFIG)  # bob's quota is his own
    for caller, job in ((alice, slow), (bob, other)):
        caller.CancelScoringJob(pb.CancelScoringJobRequest(job_id=job.job_id))
        assert _wait(caller, job.job_id).state == pb.JOB_STATE_CANCELLED
    finished = _create(alice, uri, TINY_CONFIG)  # a cancelled job no longer counts
    assert _wait(alice, finished.job_id).state == pb.JOB_STATE_SUCCEEDED


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("exports")


def _settings(tmp_path_factory: pytest.TempPathFactory, data_root: Path, exports: Path, **extra: Any) -> Any:
    return test_settings(
        state_dir=tmp_path_factory.mktemp("state"),
        data_roots=[data_root],
        export_uris=[exports.as_uri()],
        admin_principals=["root"],
        max_jobs_per_principal=1,
        **extra,
    )


@pytest.fixture(scope="module")
def token_server(
    tmp_path_factory: pytest.TempPathFactory, data_root: Path, exports: Path
) -> Iterator[RunningServer]:
    tokens = tmp_path_factory.mktemp("secrets") / "tokens"
    tokens.write_text("# tenants\n" + "".join(f"{name}: {token}\n" for name, token in TOKENS.items()))
    with running_server(_settings(tmp_path_factory, data_root, exports, tokens_file=tokens)) as server:
        yield server


def test_tokens_keep_principals_apart(token_server: RunningServer, digits_uri: str, exports: Path) -> None:
    with token_server.channel() as channel:
        alice, bob, admin = (Caller(channel, TOKENS[name]) for name in ("alice", "bob", "root"))
        _isolation(alice, bob, admin, digits_uri, exports)
        _quota(alice, bob, digits_uri)
        wrong = call_error(
            lambda: Caller(channel, "nobody-token").ListScoringJobs(pb.ListScoringJobsRequest())
        )
        assert (wrong.code, wrong.reason) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS")


@pytest.fixture(scope="module")
def tenant_pki(tmp_path_factory: pytest.TempPathFactory) -> TenantPki:
    return make_tenant_pki(tmp_path_factory.mktemp("pki"), ["alice", "bob", "root"])


@pytest.fixture(scope="module")
def mtls_server(
    tmp_path_factory: pytest.TempPathFactory, data_root: Path, exports: Path, tenant_pki: TenantPki
) -> Iterator[RunningServer]:
    settings = _settings(
        tmp_path_factory,
        data_root,
        exports,
        tls_cert_file=tenant_pki.server_cert,
        tls_key_file=tenant_pki.server_key,
        tls_client_ca_file=tenant_pki.ca_cert,
    )
    with running_server(settings) as server:
        yield server


def _mtls(server: RunningServer, pki: TenantPki, name: str) -> grpc.Channel:
    cert, key = pki.clients[name]
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca_cert.read_bytes(),
        private_key=key.read_bytes(),
        certificate_chain=cert.read_bytes(),
    )
    return grpc.secure_channel(server.address, credentials)


def test_client_certificates_keep_principals_apart(
    mtls_server: RunningServer, tenant_pki: TenantPki, digits_uri: str, exports: Path
) -> None:
    channels = [_mtls(mtls_server, tenant_pki, name) for name in ("alice", "bob", "root")]
    try:
        alice, bob, admin = (Caller(channel) for channel in channels)
        _isolation(alice, bob, admin, digits_uri, exports)
        _quota(alice, bob, digits_uri)
    finally:
        for channel in channels:
            channel.close()


def test_tokens_file_errors_name_the_line_and_never_the_token(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("alice: secret-one\nbob secret-two\n")
    with pytest.raises(SecurityConfigError, match="line 2") as raised:
        read_tokens_file(path)
    assert "secret" not in str(raised.value)
    path.write_text("alice: secret-one\nbob: secret-one\n")
    with pytest.raises(SecurityConfigError, match="line 2 repeats") as raised:
        read_tokens_file(path)
    assert "secret-one" not in str(raised.value)
    path.write_text("# comment\n\nalice: a-token\n")
    assert read_tokens_file(path) == {"a-token": "alice"}


def test_the_single_token_is_the_default_principal_beside_the_tokens_file(
    tmp_path_factory: pytest.TempPathFactory, data_root: Path, exports: Path, digits_uri: str
) -> None:
    secrets = tmp_path_factory.mktemp("secrets")
    (secrets / "tokens").write_text(f"alice: {TOKENS['alice']}\n")
    (secrets / "token").write_text("the-single-shared-token\n")
    settings = _settings(
        tmp_path_factory,
        data_root,
        exports,
        tokens_file=secrets / "tokens",
        auth_token_file=secrets / "token",
    )
    with running_server(settings) as server, server.channel() as channel:
        shared, alice = Caller(channel, "the-single-shared-token"), Caller(channel, TOKENS["alice"])
        job = _create(shared, digits_uri, SLOW_CONFIG)
        assert job.owner == "default"
        assert [j.job_id for j in shared.ListScoringJobs(pb.ListScoringJobsRequest()).jobs] == [job.job_id]
        assert list(alice.ListScoringJobs(pb.ListScoringJobsRequest()).jobs) == []
        shared.CancelScoringJob(pb.CancelScoringJobRequest(job_id=job.job_id))
        assert _wait(shared, job.job_id).state == pb.JOB_STATE_CANCELLED
