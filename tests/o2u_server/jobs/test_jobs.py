"""Job lifecycle over gRPC: create, get, list, cancel, delete, idempotency and request errors."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from o2u.v1 import scoring_pb2 as pb
from o2u.v1 import scoring_pb2_grpc
from tests.server_testing import (
    SLOW_CONFIG,
    TINY_CONFIG,
    RunningServer,
    call_error,
    create_job,
    wait_for_job,
)

Stub = scoring_pb2_grpc.ScoringServiceStub


def test_create_get_and_finish(stub: Stub, digits_uri: str) -> None:
    request_id = str(uuid.uuid4())
    job = create_job(stub, digits_uri, request_id=request_id, display_name="first")
    assert re.fullmatch(r"job-[0-9a-f]{32}", job.job_id)
    assert job.state in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING)
    assert job.request_id == request_id
    assert job.dataset.uri == digits_uri
    assert job.config.pretrain_epochs == TINY_CONFIG["pretrain_epochs"]
    assert job.config.HasField("seed")
    assert not job.config.HasField("momentum")
    assert job.create_time.seconds > 0

    done = wait_for_job(stub, job.job_id)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
    assert done.attempts == 1
    assert (
        done.end_time.ToNanoseconds() >= done.start_time.ToNanoseconds() >= done.create_time.ToNanoseconds()
    )
    info = done.run_info
    assert (info.num_samples, info.num_classes, info.device, info.model) == (400, 10, "cpu", "mlp")
    assert '"pretrain_epochs": 2' in info.resolved_config_json
    assert info.engine_version
    assert info.torch_version
    assert info.server_version


def test_score_and_augmentation_are_resolved_and_recorded(stub: Stub, digits_uri: str) -> None:
    config = {**TINY_CONFIG, "score": pb.NOISE_SCORE_KIND_O2U_LOSS, "augmentation": pb.AUGMENTATION_NONE}
    job = create_job(stub, digits_uri, config={**config, "augment": False})  # agreeing legacy switch
    assert (job.config.score, job.config.augmentation) == (pb.NOISE_SCORE_KIND_O2U_LOSS, pb.AUGMENTATION_NONE)
    done = wait_for_job(stub, job.job_id)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
    resolved = json.loads(done.run_info.resolved_config_json)
    assert (resolved["score"], resolved["augment"]) == ("o2u_loss", "none")
    default = wait_for_job(stub, create_job(stub, digits_uri).job_id)
    assert json.loads(default.run_info.resolved_config_json)["score"] == "loss_margin"  # feature vectors


def test_list_is_newest_first_filtered_and_paged(
    stub: Stub, finished_job: pb.ScoringJob, digits_uri: str
) -> None:
    newer = create_job(stub, digits_uri)
    wait_for_job(stub, newer.job_id)
    listed = stub.ListScoringJobs(pb.ListScoringJobsRequest(page_size=1)).jobs
    assert [job.job_id for job in listed] == [newer.job_id]

    seen: list[str] = []
    token = ""
    while True:
        page = stub.ListScoringJobs(pb.ListScoringJobsRequest(page_size=1, page_token=token))
        seen += [job.job_id for job in page.jobs]
        token = page.next_page_token
        if not token:
            break
    everything = stub.ListScoringJobs(pb.ListScoringJobsRequest()).jobs
    assert seen == [job.job_id for job in everything]
    assert seen.index(newer.job_id) < seen.index(finished_job.job_id)

    succeeded = stub.ListScoringJobs(pb.ListScoringJobsRequest(state=pb.JOB_STATE_SUCCEEDED)).jobs
    assert {finished_job.job_id, newer.job_id} <= {job.job_id for job in succeeded}
    assert all(job.state == pb.JOB_STATE_SUCCEEDED for job in succeeded)
    assert not stub.ListScoringJobs(pb.ListScoringJobsRequest(state=pb.JOB_STATE_QUEUED)).jobs


def test_list_page_token_is_bound_to_the_filter(
    stub: Stub, finished_job: pb.ScoringJob, digits_uri: str
) -> None:
    wait_for_job(stub, create_job(stub, digits_uri).job_id)
    token = stub.ListScoringJobs(pb.ListScoringJobsRequest(page_size=1)).next_page_token
    assert token
    error = call_error(
        lambda: stub.ListScoringJobs(pb.ListScoringJobsRequest(page_token=token, state=pb.JOB_STATE_FAILED))
    )
    assert (error.code, error.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["page_token"])
    error = call_error(lambda: stub.ListScoringJobs(pb.ListScoringJobsRequest(page_size=-1)))
    assert (error.code, error.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["page_size"])


def test_same_request_id_returns_the_same_job(stub: Stub, digits_uri: str) -> None:
    request_id = str(uuid.uuid4())
    first = create_job(stub, digits_uri, request_id=request_id)
    again = create_job(stub, digits_uri, request_id=request_id)
    assert again.job_id == first.job_id
    wait_for_job(stub, first.job_id)
    after_finish = create_job(stub, digits_uri, request_id=request_id)
    assert after_finish.job_id == first.job_id
    assert after_finish.state == pb.JOB_STATE_SUCCEEDED
    jobs = stub.ListScoringJobs(pb.ListScoringJobsRequest(page_size=1000)).jobs
    assert sum(job.request_id == request_id for job in jobs) == 1

    other = call_error(
        lambda: create_job(stub, digits_uri, config={**TINY_CONFIG, "seed": 7}, request_id=request_id)
    )
    assert other.code is grpc.StatusCode.ALREADY_EXISTS
    assert other.reason == "REQUEST_ID_REUSED"
    assert other.resource == ("scoring_job", first.job_id)


@pytest.mark.parametrize("request_id", ["has space", "x" * 65, "semi;colon"])
def test_malformed_request_id_is_invalid(stub: Stub, digits_uri: str, request_id: str) -> None:
    error = call_error(lambda: create_job(stub, digits_uri, request_id=request_id))
    assert (error.code, error.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["request_id"])


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"momentum": 1.5}, "config.momentum"),
        ({"model": "transformer"}, "config.model"),
        ({"pretrain_epochs": -1}, "config.pretrain_epochs"),
        ({"validation_fraction": 0.9}, "config.validation_fraction"),
        ({"augment": True, "augmentation": pb.AUGMENTATION_CROP_FLIP}, "config.augmentation"),
        ({"augment": False, "augmentation": pb.AUGMENTATION_CROP}, "config.augmentation"),
        ({"augmentation": 9}, "config.augmentation"),
        ({"score": 7}, "config.score"),
    ],
)
def test_bad_config_is_invalid_argument_naming_the_field(
    stub: Stub, digits_uri: str, config: dict[str, object], field: str
) -> None:
    error = call_error(lambda: create_job(stub, digits_uri, config={**TINY_CONFIG, **config}))
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "INVALID_CONFIG"
    assert error.fields == [field]
    assert field.split(".")[1] in error.message


def test_dataset_errors_at_create(stub: Stub, data_root: Path, tmp_path: Path) -> None:
    missing = call_error(lambda: create_job(stub, (data_root / "missing.npz").as_uri()))
    assert missing.code is grpc.StatusCode.NOT_FOUND
    assert "missing.npz" in missing.message

    outside = call_error(lambda: create_job(stub, (tmp_path / "x.npz").as_uri()))
    assert outside.code is grpc.StatusCode.PERMISSION_DENIED

    scheme = call_error(lambda: create_job(stub, "http://example.com/x.npz"))
    assert (scheme.code, scheme.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["dataset.uri"])

    empty_folder = data_root / "empty-folder"
    empty_folder.mkdir(exist_ok=True)
    empty = call_error(lambda: create_job(stub, empty_folder.as_uri()))
    assert empty.code is grpc.StatusCode.NOT_FOUND


def test_a_broken_dataset_fails_only_its_job(stub: Stub, data_root: Path, digits_uri: str) -> None:
    (data_root / "broken.npz").write_bytes(b"this is not a zip archive")
    broken = create_job(stub, (data_root / "broken.npz").as_uri())
    healthy = create_job(stub, digits_uri)
    failed = wait_for_job(stub, broken.job_id)
    assert failed.state == pb.JOB_STATE_FAILED
    assert failed.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert failed.error.reason
    assert failed.error.message
    assert wait_for_job(stub, healthy.job_id).state == pb.JOB_STATE_SUCCEEDED


def test_unknown_and_malformed_job_ids(stub: Stub) -> None:
    unknown = f"job-{uuid.uuid4().hex}"
    calls: list[Callable[[str], object]] = [
        lambda job_id: stub.GetScoringJob(pb.GetScoringJobRequest(job_id=job_id)),
        lambda job_id: stub.CancelScoringJob(pb.CancelScoringJobRequest(job_id=job_id)),
        lambda job_id: stub.DeleteScoringJob(pb.DeleteScoringJobRequest(job_id=job_id)),
        lambda job_id: stub.ListNoiseScores(pb.ListNoiseScoresRequest(job_id=job_id)),
        lambda job_id: stub.GetDatasetSummary(pb.GetDatasetSummaryRequest(job_id=job_id)),
        lambda job_id: list(stub.WatchScoringJob(pb.WatchScoringJobRequest(job_id=job_id))),
    ]
    for call in calls:
        missing = call_error(lambda call=call: call(unknown))  # type: ignore[misc]
        assert missing.code is grpc.StatusCode.NOT_FOUND
        assert missing.resource == ("scoring_job", unknown)
        malformed = call_error(lambda call=call: call("../etc/passwd"))  # type: ignore[misc]
        assert (malformed.code, malformed.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["job_id"])


def test_cancel_a_queued_and_a_running_job(stub: Stub, digits_uri: str) -> None:
    running = create_job(stub, digits_uri, config=SLOW_CONFIG)
    queued = create_job(stub, digits_uri)
    wait_for_job(stub, running.job_id, states=(pb.JOB_STATE_RUNNING,))

    cancelled = stub.CancelScoringJob(pb.CancelScoringJobRequest(job_id=queued.job_id)).job
    assert cancelled.state == pb.JOB_STATE_CANCELLED  # at once: it never started
    assert cancelled.attempts == 0

    requested = stub.CancelScoringJob(pb.CancelScoringJobRequest(job_id=running.job_id)).job
    assert requested.state == pb.JOB_STATE_RUNNING  # it stops at the next batch
    assert wait_for_job(stub, running.job_id, timeout=30).state == pb.JOB_STATE_CANCELLED

    again = stub.CancelScoringJob(pb.CancelScoringJobRequest(job_id=running.job_id)).job
    assert again.state == pb.JOB_STATE_CANCELLED  # a no-op on a finished job
    scores = call_error(lambda: stub.ListNoiseScores(pb.ListNoiseScoresRequest(job_id=running.job_id)))
    assert (scores.code, scores.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "JOB_NOT_SUCCEEDED")


def test_delete_only_finished_jobs(stub: Stub, server: RunningServer, digits_uri: str) -> None:
    job = create_job(stub, digits_uri, config=SLOW_CONFIG)
    wait_for_job(stub, job.job_id, states=(pb.JOB_STATE_RUNNING,))
    refused = call_error(lambda: stub.DeleteScoringJob(pb.DeleteScoringJobRequest(job_id=job.job_id)))
    assert (refused.code, refused.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "JOB_NOT_FINISHED")
    not_ready = call_error(lambda: stub.ListNoiseScores(pb.ListNoiseScoresRequest(job_id=job.job_id)))
    assert (not_ready.code, not_ready.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "JOB_NOT_FINISHED")
    summary = call_error(lambda: stub.GetDatasetSummary(pb.GetDatasetSummaryRequest(job_id=job.job_id)))
    assert summary.code is grpc.StatusCode.FAILED_PRECONDITION
    checkpoint = server.settings.checkpoint_dir / f"{job.job_id}.pt"

    stub.CancelScoringJob(pb.CancelScoringJobRequest(job_id=job.job_id))
    wait_for_job(stub, job.job_id, timeout=30)
    stub.DeleteScoringJob(pb.DeleteScoringJobRequest(job_id=job.job_id))
    gone = call_error(lambda: stub.GetScoringJob(pb.GetScoringJobRequest(job_id=job.job_id)))
    assert gone.code is grpc.StatusCode.NOT_FOUND
    assert not checkpoint.exists()
    assert job.job_id not in {
        j.job_id for j in stub.ListScoringJobs(pb.ListScoringJobsRequest(page_size=1000)).jobs
    }


def test_full_queue_is_resource_exhausted(
    start_server: Callable[..., RunningServer], digits_uri: str
) -> None:
    running = start_server(max_queued_jobs=1)
    with running.channel() as channel:
        stub = Stub(channel)
        busy = create_job(stub, digits_uri, config=SLOW_CONFIG)
        wait_for_job(stub, busy.job_id, states=(pb.JOB_STATE_RUNNING,))
        waiting = create_job(stub, digits_uri)
        full = call_error(lambda: create_job(stub, digits_uri))
        assert (full.code, full.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "QUEUE_FULL")
        assert full.retry_delay_seconds is not None
        assert full.retry_delay_seconds > 0
        stub.CancelScoringJob(pb.CancelScoringJobRequest(job_id=waiting.job_id))
        create_job(stub, digits_uri)  # room again
        stub.CancelScoringJob(pb.CancelScoringJobRequest(job_id=busy.job_id))
