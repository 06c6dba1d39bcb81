"""Failed calls raise the O2UError subclass of their status code, with the server's google.rpc
details parsed; UNAVAILABLE is retried only where repeating the call is safe, and a submission
whose answer came too late (DEADLINE_EXCEEDED), or that a full queue turned away with a retry delay,
is repeated with its request_id, which the error carries when the retries run out; a quota's
refusal, which has no retry delay, is not."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from o2u_client import (
    AlreadyExistsError,
    Client,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    Job,
    NotFoundError,
    O2UError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnavailableError,
)
from o2u_client.cli import _print_error
from tests.o2u_client.full_queue import FreeTheQueueWhenFull, full_queue
from tests.server_testing import SLOW_CONFIG, TINY_CONFIG, RunningServer

# A well-formed job id that no server ever issued.
MISSING_JOB_ID = "job-" + "0" * 32


def test_not_found_carries_reason_and_resource(client: Client) -> None:
    with pytest.raises(NotFoundError) as caught:
        client.get(MISSING_JOB_ID)
    error = caught.value
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.code_name == "NOT_FOUND"
    assert error.reason == "JOB_NOT_FOUND"
    assert error.domain == "o2u.dev"
    assert error.resource_type == "scoring_job"
    assert error.resource_name == MISSING_JOB_ID
    assert MISSING_JOB_ID in error.message
    assert error.exit_code == 4
    assert str(error).startswith("NOT_FOUND: ")
    assert error.to_dict()["reason"] == "JOB_NOT_FOUND"

    with pytest.raises(InvalidArgumentError) as malformed:
        client.get("job-x")
    assert malformed.value.reason == "INVALID_JOB_ID"
    assert malformed.value.field_violations[0].field == "job_id"


def test_invalid_config_names_the_field(client: Client, dataset_uri: str) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        client.submit(dataset_uri, config=TINY_CONFIG, noise_rate=1.5)
    error = caught.value
    assert error.reason == "INVALID_CONFIG"
    assert [violation.field for violation in error.field_violations] == ["config.noise_rate"]
    assert error.field_violations[0].description
    assert error.exit_code == 5


def test_dataset_outside_the_data_roots_is_denied(client: Client, tmp_path: Path) -> None:
    with pytest.raises(PermissionDeniedError) as caught:
        client.submit((tmp_path / "elsewhere.npz").as_uri())
    assert caught.value.reason == "PATH_OUTSIDE_DATA_ROOTS"
    assert caught.value.exit_code == 10


def test_reused_request_id_with_another_payload(client: Client, dataset_uri: str) -> None:
    request_id = str(uuid.uuid4())
    job = client.submit(dataset_uri, config=SLOW_CONFIG, request_id=request_id)
    try:
        with pytest.raises(AlreadyExistsError) as caught:
            client.submit(dataset_uri, config={**TINY_CONFIG, "seed": 99}, request_id=request_id)
        assert caught.value.reason == "REQUEST_ID_REUSED"
        assert caught.value.resource_name == job.job_id

        with pytest.raises(FailedPreconditionError) as unfinished:
            client.summary(job.job_id)
        assert unfinished.value.reason == "JOB_NOT_FINISHED"
        with pytest.raises(FailedPreconditionError):
            client.delete(job.job_id)
    finally:
        client.cancel(job.job_id)


def test_foreign_page_token_is_rejected(client: Client, finished_job: Job) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        client.score_page(finished_job.job_id, page_token="not-a-token")
    assert caught.value.reason == "INVALID_PAGE_TOKEN"
    assert caught.value.field_violations[0].field == "page_token"
    with pytest.raises(InvalidArgumentError):
        client.score_page(finished_job.job_id, page_size=-1)


def test_client_side_validation(client: Client, dataset_uri: str) -> None:
    with pytest.raises(TypeError, match="unknown ScoringConfig field 'learning_rate'"):
        client.submit(dataset_uri, learning_rate=0.1)
    with pytest.raises(ValueError, match="unknown format 'hdf5'"):
        client.submit(dataset_uri, format="hdf5")
    with pytest.raises(ValueError, match="unknown job state"):
        list(client.list(state="sleeping"))


class _CountingInterceptor(grpc.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    """Counts attempts per method, to see the client's retries from the outside."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def intercept_unary_unary(
        self, continuation: Callable[[Any, Any], Any], client_call_details: Any, request: Any
    ) -> Any:
        method = str(client_call_details.method).rsplit("/", 1)[-1]
        self.calls[method] = self.calls.get(method, 0) + 1
        return continuation(client_call_details, request)


def test_unavailable_is_retried_only_for_safe_calls(free_port: int) -> None:
    counter = _CountingInterceptor()
    target = f"127.0.0.1:{free_port}"  # nothing listens here
    with Client(target, timeout=2.0, wait_for_ready=False, retries=2, interceptors=[counter]) as client:
        started = time.monotonic()
        with pytest.raises(UnavailableError) as caught:
            client.get("job-x")
        assert time.monotonic() - started < 10
        assert caught.value.exit_code == 6
        with pytest.raises(UnavailableError):
            client.delete("job-x")
    assert counter.calls == {"GetScoringJob": 3, "DeleteScoringJob": 1}


class _ResponseLost(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    """What a caller sees when the connection drops after the server acted on the call."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection reset by peer"

    def initial_metadata(self) -> tuple[()]:
        return ()

    def trailing_metadata(self) -> tuple[()]:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> None:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return False

    def result(self, timeout: float | None = None) -> Any:
        raise self


class _ResponseLate(_ResponseLost):
    """What a caller sees when the server acted on the call but answered after its timeout."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.DEADLINE_EXCEEDED

    def details(self) -> str:
        return "Deadline Exceeded"


class _LoseFirstResponse(grpc.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    """Lets the first `times` calls of `method` (every one when None) reach the server and complete
    there, then loses their answers as `lost`."""

    def __init__(
        self, method: str, *, lost: type[_ResponseLost] = _ResponseLost, times: int | None = 1
    ) -> None:
        self.method = method
        self.lost = lost
        self.times = times
        self.calls = 0
        self.requests: list[Any] = []

    def intercept_unary_unary(
        self, continuation: Callable[[Any, Any], Any], client_call_details: Any, request: Any
    ) -> Any:
        outcome = continuation(client_call_details, request)
        if str(client_call_details.method).endswith("/" + self.method):
            self.calls += 1
            self.requests.append(request)
            if self.times is None or self.calls <= self.times:
                outcome.result()  # the server has answered: the export is written, the job created
                return self.lost()
        return outcome


def _jobs_with_request_id(client: Client, request_id: str) -> list[str]:
    return [job.job_id for job in client.list() if job.request_id == request_id]


def test_a_submission_answered_too_late_is_retried_with_its_request_id(
    server: RunningServer, dataset_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    late = _LoseFirstResponse("CreateScoringJob", lost=_ResponseLate)
    with Client(server.address, timeout=20.0, retries=2, interceptors=[late]) as client:
        job = client.submit(dataset_uri, config=TINY_CONFIG)
        assert late.calls == 2
        assert [request.request_id for request in late.requests] == [job.request_id] * 2
        assert _jobs_with_request_id(client, job.request_id) == [job.job_id], "no second job"

    always_late = _LoseFirstResponse("CreateScoringJob", lost=_ResponseLate, times=None)
    with (
        Client(server.address, timeout=20.0, retries=1, interceptors=[always_late]) as client,
        pytest.raises(DeadlineExceededError) as caught,
    ):
        client.submit(dataset_uri, config=TINY_CONFIG)
    request_id = caught.value.request_id
    assert request_id is not None
    assert [request.request_id for request in always_late.requests] == [request_id] * 2
    assert caught.value.to_dict()["request_id"] == request_id
    _print_error(caught.value)
    assert f"rerun with --request-id {request_id}" in capsys.readouterr().err
    # The caller's own retry with that id finds the job the lost attempts created.
    with Client(server.address, timeout=20.0) as client:
        again = client.submit(dataset_uri, config=TINY_CONFIG, request_id=request_id)
        assert _jobs_with_request_id(client, request_id) == [again.job_id]


def test_a_full_queue_is_waited_out_and_a_quota_is_not(
    start_server: Callable[..., RunningServer], dataset_uri: str
) -> None:
    with full_queue(start_server, dataset_uri) as (server, owner, running, queued):
        freeing = FreeTheQueueWhenFull(lambda: owner.cancel(queued.job_id))
        # The server asks for 30 s (QUEUE_FULL); a shorter cap keeps the test quick.
        with Client(server.address, timeout=20.0, max_retry_delay=0.5, interceptors=[freeing]) as client:
            job = client.submit(dataset_uri, config=TINY_CONFIG)
        assert len(freeing.requests) == 2, "refused once, then let in"
        assert [request.request_id for request in freeing.requests] == [job.request_id] * 2
        assert _jobs_with_request_id(owner, job.request_id) == [job.job_id], "one job"
        for job_id in (running.job_id, job.job_id):
            owner.cancel(job_id)

    # RESOURCE_EXHAUSTED without a retry delay (the principal's quota) fails the first time.
    server = start_server(max_jobs_per_principal=1, shutdown_grace_seconds=0.5)
    counter = _CountingInterceptor()
    with Client(server.address, timeout=20.0, interceptors=[counter]) as client:
        first = client.submit(dataset_uri, config=SLOW_CONFIG)
        try:
            with pytest.raises(ResourceExhaustedError) as caught:
                client.submit(dataset_uri, config=SLOW_CONFIG)
        finally:
            client.cancel(first.job_id)
    assert caught.value.reason == "PRINCIPAL_QUOTA_EXCEEDED"
    assert caught.value.retry_delay is None, "nothing says when to come back: no retry"
    assert caught.value.request_id is not None
    assert counter.calls["CreateScoringJob"] == 2, "one attempt each"


def test_a_retried_export_that_finds_its_own_file_says_so(
    server: RunningServer, finished_job: Job, data_root: Path
) -> None:
    destination = data_root / "exports" / f"{uuid.uuid4().hex}.jsonl"
    lose = _LoseFirstResponse("ExportNoiseScores")
    with Client(server.address, timeout=20.0, retries=2, interceptors=[lose]) as client:
        with pytest.raises(AlreadyExistsError) as caught:
            client.export(finished_job.job_id, destination.as_uri())
        assert lose.calls == 2
        assert destination.stat().st_size > 0, "the first attempt wrote the export"
        assert caught.value.reason == "DESTINATION_EXISTS"
        assert "retried after UNAVAILABLE" in str(caught.value)
        assert "export to a new name" in caught.value.message
        # Without a retry, the same refusal carries only the server's message.
        with pytest.raises(AlreadyExistsError) as again:
            client.export(finished_job.job_id, destination.as_uri())
        assert "retried" not in str(again.value)


def test_error_without_a_known_class_is_an_o2u_error() -> None:
    from o2u_client.errors import error_class

    assert error_class(grpc.StatusCode.DATA_LOSS) is O2UError
    assert O2UError(grpc.StatusCode.DATA_LOSS, "lost").exit_code == 3
