"""Property-based fuzz of every request message against one live server.

Requests are built from the protobuf descriptors: every field of every request type (nested
messages included) is left unset or given a random value of its type - arbitrary text, extreme
integers, NaN and infinities, unknown enum numbers - mixed with values that reach deeper code paths
(a real finished job, its page tokens, URIs under and outside the data root). Whatever arrives, the
server must answer OK or one of the documented codes, never INTERNAL or UNKNOWN, and stay healthy.
Jobs the fuzz manages to create are cancelled at once so the run stays short.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import grpc
import pytest
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import message as pb_message
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from o2u.v1 import scoring_pb2 as pb
from o2u.v1 import scoring_pb2_grpc
from tests.server_testing import RunningServer, create_job, running_server, test_settings, wait_for_job

Stub = scoring_pb2_grpc.ScoringServiceStub
FieldDescriptor = pb_descriptor.FieldDescriptor
SERVICE = pb.DESCRIPTOR.services_by_name["ScoringService"]
DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.PERMISSION_DENIED,
}
# Delete last: it may delete the finished job the other methods use to reach deeper code.
METHODS = [name for name in SERVICE.methods_by_name if name != "DeleteScoringJob"] + ["DeleteScoringJob"]
INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Iterator[RunningServer]:
    settings = test_settings(
        state_dir=tmp_path_factory.mktemp("state"),
        data_roots=[data_root],
        max_queued_jobs=20,
        max_page_size=50,
    )
    with running_server(settings) as running:
        yield running


@pytest.fixture(scope="module")
def known(stub: Stub, digits_uri: str, data_root: Path) -> dict[str, list[str]]:
    """Values that pass the first checks, so the fuzz also reaches the code behind them."""
    job = wait_for_job(stub, create_job(stub, digits_uri).job_id)
    assert job.state == pb.JOB_STATE_SUCCEEDED
    scores = stub.ListNoiseScores(pb.ListNoiseScoresRequest(job_id=job.job_id, page_size=5))
    jobs = stub.ListScoringJobs(pb.ListScoringJobsRequest(page_size=1))
    return {
        "job_id": [job.job_id, f"job-{uuid.uuid4().hex}"],
        "page_token": [
            scores.next_page_token,
            jobs.next_page_token or "x.y",
            scores.next_page_token[:-3] + "AAA",
        ],
        "uri": [
            digits_uri,
            (data_root / "fuzz-export.jsonl").as_uri(),
            (data_root / "fuzz-export.csv").as_uri(),
            (data_root / "fuzz-missing.npz").as_uri(),  # a name no other test expects to be absent
            f"file://{data_root}/../etc/passwd",
            "file:///etc/passwd",
            "s3://bucket/key.npz",
            "s3://host:9000/bucket/key",
            "",
        ],
        "request_id": [str(uuid.uuid4()), "fixed-request-id"],
        "model": ["auto", "mlp", "small_cnn", "cnn9", "resnet18", "unknown"],
    }


def _string(field: FieldDescriptor, known: dict[str, list[str]]) -> st.SearchStrategy[str]:
    text = st.text(max_size=80)
    key = "uri" if field.name.endswith("uri") else field.name
    if key in known:
        useful = st.sampled_from(known[key])
        return st.one_of(useful, useful, text)  # two to one: get past the first checks more often
    return text


def _scalar(field: FieldDescriptor, known: dict[str, list[str]]) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind in INT_RANGES:
        low, high = INT_RANGES[kind]
        return st.one_of(st.integers(-3, 40), st.integers(low, high), st.sampled_from([low, high]))
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        width: Literal[32, 64] = 64 if kind == FieldDescriptor.TYPE_DOUBLE else 32
        return st.one_of(st.sampled_from([0.0, -0.0, 1e-300, 0.5]), st.floats(width=width))
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_STRING:
        return _string(field, known)
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        numbers = [value.number for value in field.enum_type.values]
        return st.one_of(st.sampled_from(numbers), st.integers(-(2**31), 2**31 - 1))  # open enums
    raise AssertionError(f"no strategy for field {field.full_name} of type {kind}")


def message_strategy(
    descriptor: pb_descriptor.Descriptor, known: dict[str, list[str]], depth: int = 0
) -> st.SearchStrategy[pb_message.Message]:
    """Messages of `descriptor` with any subset of fields set to random values."""
    cls = message_factory.GetMessageClass(descriptor)
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            assert field.message_type is not None
            if depth >= 3:
                continue
            value: st.SearchStrategy[Any] = message_strategy(field.message_type, known, depth + 1)
        else:
            value = _scalar(field, known)
        fields[field.name] = st.lists(value, max_size=3) if field.is_repeated else value
    return st.fixed_dictionaries({}, optional=fields).map(lambda values: cls(**values))


def _call(stub: Stub, method: str, request: Any) -> grpc.StatusCode:
    try:
        if method == "WatchScoringJob":
            stream: Any = stub.WatchScoringJob(request, timeout=20)
            for count, _ in enumerate(stream):
                if count >= 20:
                    stream.cancel()
                    break
            return grpc.StatusCode.OK
        response = getattr(stub, method)(request, timeout=20)
        if method == "CreateScoringJob":
            stub.CancelScoringJob(pb.CancelScoringJobRequest(job_id=response.job.job_id), timeout=20)
        return grpc.StatusCode.OK
    except grpc.RpcError as error:
        code: grpc.StatusCode = error.code()
        if code == grpc.StatusCode.CANCELLED and method == "WatchScoringJob":
            return grpc.StatusCode.OK  # our own cancel after enough events
        return code


def _health(server: RunningServer) -> int:
    with server.channel() as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status)


@pytest.mark.parametrize("method", METHODS)
def test_every_request_gets_a_documented_code(
    server: RunningServer, stub: Stub, known: dict[str, list[str]], method: str
) -> None:
    request_type = SERVICE.methods_by_name[method].input_type
    seen: dict[grpc.StatusCode, int] = {}

    @settings(
        max_examples=40,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(message_strategy(request_type, known))
    def check(request: pb_message.Message) -> None:
        code = _call(stub, method, request)
        seen[code] = seen.get(code, 0) + 1
        assert code in DOCUMENTED, f"{method} answered {code.name} to {request!r}"

    check()
    assert _health(server) == health_pb2.HealthCheckResponse.SERVING
    assert sum(seen.values()) >= 10, seen


def test_server_survived_the_fuzz(server: RunningServer, stub: Stub, digits_uri: str) -> None:
    assert "INTERNAL" not in {
        line.split('code="')[1].split('"')[0] for line in server.scrape().splitlines() if 'code="' in line
    }
    job = wait_for_job(stub, create_job(stub, digits_uri).job_id)
    assert job.state == pb.JOB_STATE_SUCCEEDED, "the server still runs jobs after the fuzz"
