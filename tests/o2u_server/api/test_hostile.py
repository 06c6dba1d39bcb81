"""Hostile inputs at the RPC level: each gets its documented status code and the server stays healthy.

Faults visible in the request (paths, URIs, identifiers, page tokens, message size) are refused by
the call itself and leave no job behind; faults inside a dataset or weights file are found when the
job loads it, so the job ends FAILED with the code in its JobError. After every test the health
service must still answer SERVING. Unit-level checks of the same inputs live in storage/test_storage.py,
datasets/test_datasets.py and datasets/test_dataset_images.py; identifiers and page tokens also in
jobs/test_jobs.py and jobs/test_scores.py - here they are the variants those do not send.
"""

from __future__ import annotations

import functools
import os
import pickle
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from o2u.v1 import scoring_pb2 as pb
from o2u.v1 import scoring_pb2_grpc
from tests.o2u_server.dataset_files import bomb_png, png
from tests.s3_server import S3Server, running_s3_server
from tests.server_testing import (
    TINY_CONFIG,
    RunningServer,
    call_error,
    create_job,
    running_server,
    test_settings,
    wait_for_job,
    write_noisy_digits,
)

Stub = scoring_pb2_grpc.ScoringServiceStub
BUCKET = "datasets"
MAX_MESSAGE_BYTES = 256 * 1024
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hostile-root")
    write_noisy_digits(folder / "digits.npz", samples=120)
    return folder


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder beside the data root holding a perfectly valid dataset the server must never read."""
    folder = tmp_path_factory.mktemp("outside")
    write_noisy_digits(folder / "secret.npz", samples=100)
    return folder


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with running_s3_server() as server:
        server.make_bucket(BUCKET)
        server.make_bucket("private")
        yield server


@pytest.fixture(scope="module")
def server(root: Path, s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    settings = test_settings(
        state_dir=tmp_path_factory.mktemp("state"),
        data_roots=[root],
        s3_allowed_buckets=[BUCKET],
        max_message_bytes=MAX_MESSAGE_BYTES,
        max_classes=50,  # the largest whose summaries fit in MAX_MESSAGE_BYTES
        max_page_size=50,
        **s3.settings_kwargs(),
    )
    with running_server(settings) as running:
        yield running


@pytest.fixture(autouse=True)
def still_healthy(server: RunningServer) -> Iterator[None]:
    yield
    with server.channel() as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
    assert answer.status == health_pb2.HealthCheckResponse.SERVING, "the server is unhealthy after the test"


def _job_count(stub: Stub) -> int:
    return len(stub.ListScoringJobs(pb.ListScoringJobsRequest(page_size=50), timeout=10).jobs)


def _npz(path: Path, **arrays: Any) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        np.savez(handle, **arrays)
    return path.as_uri()


def _failed(stub: Stub, uri: str, **fields: Any) -> pb.JobError:
    """Run a job on `uri` and return its error; it must have FAILED."""
    job = wait_for_job(stub, create_job(stub, uri, **fields).job_id, timeout=60)
    assert job.state == pb.JOB_STATE_FAILED, f"expected FAILED, got {pb.JobState.Name(job.state)}"
    assert job.error.message
    assert job.error.reason
    error: pb.JobError = job.error
    return error


# ---------------------------------------------------------------------------------------------------
# Paths and URIs: refused at create, nothing stored
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "reason"),
    [
        ("file://{root}/../{outside_name}/secret.npz", "PATH_TRAVERSAL"),
        ("file://{root}/%2e%2e/{outside_name}/secret.npz", "PATH_TRAVERSAL"),
        ("file://{root}/%2E%2E%2F{outside_name}/secret.npz", "PATH_TRAVERSAL"),
        ("file://{root}/%252e%252e/{outside_name}/secret.npz", "PATH_TRAVERSAL"),
        ("file://{outside}/secret.npz", "PATH_OUTSIDE_DATA_ROOTS"),
        ("file:///etc/passwd", "PATH_OUTSIDE_DATA_ROOTS"),
        ("file://{root}/escape.npz", "PATH_OUTSIDE_DATA_ROOTS"),  # symlink to the outside file
        ("file://{root}/escape-dir/secret.npz", "PATH_OUTSIDE_DATA_ROOTS"),  # symlinked folder
        ("file://{root}-sibling/secret.npz", "PATH_OUTSIDE_DATA_ROOTS"),  # shares the root's prefix
    ],
)
def test_traversal_is_permission_denied(
    stub: Stub, root: Path, outside: Path, template: str, reason: str
) -> None:
    if not (root / "escape.npz").exists():
        os.symlink(outside / "secret.npz", root / "escape.npz")
        os.symlink(outside, root / "escape-dir")
    sibling = Path(f"{root}-sibling")
    sibling.mkdir(exist_ok=True)
    (sibling / "secret.npz").write_bytes((outside / "secret.npz").read_bytes())
    uri = template.format(root=root, outside=outside, outside_name=outside.name)
    before = _job_count(stub)
    error = call_error(lambda: create_job(stub, uri))
    assert (error.code, error.reason, error.fields) == (
        grpc.StatusCode.PERMISSION_DENIED,
        reason,
        ["dataset.uri"],
    )
    weights = call_error(
        lambda: create_job(
            stub, (root / "digits.npz").as_uri(), config={**TINY_CONFIG, "initial_weights_uri": uri}
        )
    )
    assert (weights.code, weights.fields) == (
        grpc.StatusCode.PERMISSION_DENIED,
        ["config.initial_weights_uri"],
    )
    assert _job_count(stub) == before


@pytest.mark.parametrize(
    ("uri", "code", "reason"),
    [
        ("s3://evil.example.com:9000/datasets/x.npz", INVALID, "S3_ENDPOINT_IN_URI"),
        ("s3://user:secret@datasets/x.npz", INVALID, "S3_ENDPOINT_IN_URI"),
        ("s3://169.254.169.254/latest/meta-data", INVALID, "INVALID_BUCKET"),
        ("https://evil.example.com/x.npz", INVALID, "UNSUPPORTED_SCHEME"),
        ("file://evil.example.com/etc/passwd", INVALID, "INVALID_URI"),
        ("s3://private/x.npz", grpc.StatusCode.PERMISSION_DENIED, "BUCKET_NOT_ALLOWED"),
        ("s3://datasets/../private/x.npz", INVALID, "INVALID_URI"),
    ],
)
def test_uris_naming_other_hosts_or_buckets_are_refused(
    stub: Stub, s3: S3Server, uri: str, code: grpc.StatusCode, reason: str
) -> None:
    s3.put("private", "x.npz", b"a private object")
    before = _job_count(stub)
    error = call_error(lambda: create_job(stub, uri))
    assert (error.code, error.reason) == (code, reason)
    assert _job_count(stub) == before


def test_an_allowed_bucket_works(stub: Stub, s3: S3Server, root: Path) -> None:
    s3.put(BUCKET, "ok/digits.npz", (root / "digits.npz").read_bytes())
    job = wait_for_job(stub, create_job(stub, f"s3://{BUCKET}/ok/digits.npz").job_id)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error


# ---------------------------------------------------------------------------------------------------
# Malicious or malformed files: found when the job loads them
# ---------------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates the marker file: proof that pickled code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_npz_with_object_arrays_is_refused(stub: Stub, root: Path) -> None:
    marker = root / "npz-pickle-ran"
    x = np.empty(4, dtype=object)
    x[:] = [_Payload(marker), 1, 2, 3]
    uri = _npz(root / "objects.npz", x=x, y=np.array([0, 1, 0, 1]))
    error = _failed(stub, uri)
    assert error.code == INVALID.value[0]
    assert not marker.exists()


@pytest.mark.parametrize("wrapper", ["torch.save", "raw pickle"])
def test_weights_file_with_a_pickle_payload_is_refused(stub: Stub, root: Path, wrapper: str) -> None:
    marker = root / f"weights-pickle-ran-{wrapper.replace(' ', '-')}"
    weights = root / f"evil-{wrapper.replace(' ', '-')}.pt"
    payload = {"layer.weight": _Payload(marker)}
    if wrapper == "torch.save":
        torch.save(payload, weights)
    else:
        weights.write_bytes(pickle.dumps(payload, protocol=2))  # the protocol torch.load expects
    error = _failed(
        stub, (root / "digits.npz").as_uri(), config={**TINY_CONFIG, "initial_weights_uri": weights.as_uri()}
    )
    assert (error.code, error.reason) == (INVALID.value[0], "INVALID_CONFIG")
    assert "weights_only" in error.message
    assert not marker.exists(), "the pickled code ran"


def _image_folder(root: Path, name: str, bad: bytes) -> str:
    folder = root / name
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        for index in range(3):
            pixels = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
            (folder / label).mkdir(parents=True, exist_ok=True)
            (folder / label / f"{index}.png").write_bytes(png(pixels))
    (folder / "dog" / "zz-bad.png").write_bytes(bad)
    return folder.as_uri()


def test_decompression_bomb_is_resource_exhausted(stub: Stub, root: Path) -> None:
    error = _failed(stub, _image_folder(root, "bomb", bomb_png(5_000, 5_000)))
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert "max_image_pixels" in error.message
    assert "zz-bad.png" in error.message


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_broken_images_are_invalid(stub: Stub, root: Path, damage: str) -> None:
    noise = np.random.default_rng(1).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    bad = png(noise)[:300] if damage == "truncated" else b"\x89PNG\r\n\x1a\n" + os.urandom(200)
    error = _failed(stub, _image_folder(root, damage, bad))
    assert error.code == INVALID.value[0]
    assert "zz-bad.png" in error.message


_FEATURES = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)
_LABELS = np.arange(40) % 4


@pytest.mark.parametrize(
    ("name", "arrays", "mentions"),
    [
        ("negative", {"y": np.where(_LABELS == 3, -1, _LABELS)}, "negative"),
        ("past-k", {"y": np.where(_LABELS == 3, 7, _LABELS), "class_names": np.array(list("abcd"))}, "7"),
        ("fractional", {"y": _LABELS + 0.5}, "label"),
        ("unknown-string", {"y": np.array(list("abcz") * 10), "class_names": np.array(list("abcd"))}, "'z'"),
        ("wrong-length", {"y": _LABELS[:-3]}, "40"),
        ("two-dimensional", {"y": _LABELS.reshape(10, 4)}, "shape"),
        ("single-class", {"y": np.zeros(40, dtype=np.int64)}, "class"),
        ("nan", {"x": np.where(np.arange(240).reshape(40, 6) == 77, np.nan, _FEATURES)}, "finite"),
        ("inf", {"x": np.where(np.arange(240).reshape(40, 6) == 5, np.inf, _FEATURES)}, "finite"),
        ("empty", {"x": _FEATURES[:0], "y": _LABELS[:0]}, "sample"),
        ("no-labels", {"y": None}, "y"),
    ],
)
def test_bad_arrays_fail_the_job_with_invalid_argument(
    stub: Stub, root: Path, name: str, arrays: dict[str, Any], mentions: str
) -> None:
    contents = {"x": _FEATURES, "y": _LABELS, **arrays}
    uri = _npz(root / "arrays" / f"{name}.npz", **{k: v for k, v in contents.items() if v is not None})
    error = _failed(stub, uri)
    assert error.code == INVALID.value[0], error
    assert mentions in error.message.lower() or mentions in error.message, error.message


def test_labels_that_are_not_labels_in_a_manifest(stub: Stub, root: Path) -> None:
    folder = root / "manifest"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(2)
    lines = []
    for index in range(6):
        (folder / f"{index}.png").write_bytes(png(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)))
        label = '{"nested": 1}' if index == 4 else str(index % 2)
        lines.append(f'{{"key": "{index}.png", "label": {label}}}')
    (folder / "labels.jsonl").write_text("\n".join(lines) + "\n")
    error = _failed(stub, (folder / "labels.jsonl").as_uri())
    assert error.code == INVALID.value[0]


# ---------------------------------------------------------------------------------------------------
# Identifiers, pages and message sizes
# ---------------------------------------------------------------------------------------------------


def test_page_size_is_capped_and_forged_job_page_tokens_are_invalid(stub: Stub, root: Path) -> None:
    uri = (root / "digits.npz").as_uri()
    jobs = [create_job(stub, uri) for _ in range(2)]
    huge = stub.ListScoringJobs(pb.ListScoringJobsRequest(page_size=2**31 - 1), timeout=10)
    assert 0 < len(huge.jobs) <= 50  # max_page_size of this server
    one = stub.ListScoringJobs(pb.ListScoringJobsRequest(page_size=1), timeout=10)
    assert one.next_page_token
    forged = [
        "A" * 10_000,
        one.next_page_token[::-1],
        one.next_page_token.replace(".", ".AAAA"),
        "eyJiIjogIngiLCAiYSI6IDAsICJ0IjogMH0.AAAAAAAAAAAAAAAAAAAAAA",  # a body without a valid signature
        "\u00e9\u00e8.\u00e0",
    ]
    for token in forged:
        request = pb.ListScoringJobsRequest(page_token=token)
        error = call_error(functools.partial(stub.ListScoringJobs, request, timeout=10))
        assert (error.code, error.fields) == (INVALID, ["page_token"])
    for job in jobs:
        wait_for_job(stub, job.job_id)


@pytest.mark.parametrize(
    "job_id",
    ["", "job-" + "0" * 31 + "\u00e9", "job-" + "0" * 32 + "\x00", "job-" + "f" * 100_000, "JOB-" + "A" * 32],
)
def test_malformed_job_ids_are_invalid(stub: Stub, job_id: str) -> None:
    get = call_error(lambda: stub.GetScoringJob(pb.GetScoringJobRequest(job_id=job_id), timeout=10))
    assert (get.code, get.fields) == (INVALID, ["job_id"])
    assert len(get.message) < 1000, "the error must not echo a huge identifier back"
    watch = call_error(
        lambda: list(stub.WatchScoringJob(pb.WatchScoringJobRequest(job_id=job_id), timeout=10))
    )
    assert watch.code == INVALID
    export = pb.ExportNoiseScoresRequest(job_id=job_id, destination_uri="file:///tmp/x.jsonl")
    assert call_error(lambda: stub.ExportNoiseScores(export, timeout=10)).code == INVALID


def test_request_ids_malformed_and_reused(stub: Stub, root: Path) -> None:
    uri = _npz(root / "reuse.npz", x=_FEATURES, y=_LABELS)
    for malformed in ("\u00e9t\u00e9", "a\x00b", "../../etc", "a" * 10_000):
        error = call_error(functools.partial(create_job, stub, uri, request_id=malformed))
        assert (error.code, error.fields) == (INVALID, ["request_id"])
    request_id = str(uuid.uuid4())
    first = create_job(stub, uri, request_id=request_id)
    other_uri = _npz(root / "reuse-other.npz", x=_FEATURES, y=_LABELS)
    for target, display_name in ((other_uri, ""), (uri, "renamed")):
        reuse = functools.partial(create_job, stub, target, request_id=request_id, display_name=display_name)
        error = call_error(reuse)
        assert (error.code, error.reason) == (grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")
    assert create_job(stub, uri, request_id=request_id).job_id == first.job_id
    wait_for_job(stub, first.job_id)


def test_oversized_messages_are_resource_exhausted(stub: Stub, channel: grpc.Channel, root: Path) -> None:
    before = _job_count(stub)
    big = "x" * (MAX_MESSAGE_BYTES + 1)
    error = call_error(lambda: create_job(stub, (root / "digits.npz").as_uri(), display_name=big))
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    raw = os.urandom(MAX_MESSAGE_BYTES * 2)
    unary = channel.unary_unary("/o2u.v1.ScoringService/GetScoringJob", None, None)
    assert call_error(lambda: unary(raw, timeout=10)).code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _job_count(stub) == before
