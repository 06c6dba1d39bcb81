"""What the replicas agree on beyond the queue: any replica exports any job's scores to the export
locations (and none replaces what another wrote), and a job taken over by another replica after a
crash still notices that its dataset changed since it started training (DATASET_CHANGED), although
it resumes from a checkpoint in object storage that another replica wrote."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from o2u.v1 import scoring_pb2 as pb
from tests.o2u_server.replicas.cluster import EXPORT_BUCKET, Cluster, events, get, wait_until
from tests.server_testing import TINY_CONFIG, call_error, create_job

SUCCEEDED, FAILED = pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED
SMALL: dict[str, Any] = {**TINY_CONFIG, "pretrain_epochs": 4, "num_cycles": 2}  # 400 digits, ~2 s
# Stage 1 long enough to kill the replica inside it: 30 epochs of 50 batches.
LONG: dict[str, Any] = {**TINY_CONFIG, "pretrain_epochs": 30, "pretrain_batch_size": 8}


def _export(cluster: Cluster, replica: Any, job_id: str, uri: str) -> pb.ExportNoiseScoresResponse:
    request = pb.ExportNoiseScoresRequest(job_id=job_id, destination_uri=uri)
    with cluster.stub(replica) as stub:
        response: pb.ExportNoiseScoresResponse = stub.ExportNoiseScores(request, timeout=60)
    return response


def test_every_replica_exports_under_the_export_locations_and_none_overwrites(
    cluster: Cluster, digits_root: Path
) -> None:
    with cluster.stub(cluster.replicas[0]) as stub:
        job_id = create_job(stub, (digits_root / "small.npz").as_uri(), config=SMALL).job_id
        assert wait_until(stub, job_id, lambda job: job.state in (SUCCEEDED, FAILED)).state == SUCCEEDED
    written: list[bytes] = []
    for n, replica in enumerate(cluster.replicas):  # the job ran on one of them; each one exports it
        s3_key = f"o2u/{job_id}/from-{n}.jsonl"
        to_s3 = _export(cluster, replica, job_id, f"s3://{EXPORT_BUCKET}/{s3_key}")
        folder = cluster.export_folder / job_id
        to_file = _export(cluster, replica, job_id, (folder / f"from-{n}.jsonl").as_uri())
        assert to_s3.rows_written == to_file.rows_written == 400
        written += [cluster.s3.get(EXPORT_BUCKET, s3_key), (folder / f"from-{n}.jsonl").read_bytes()]
    assert len(set(written)) == 1, "every replica writes the same export"
    assert len(json.loads(written[0].splitlines()[0])) > 3

    # A destination another replica wrote is never replaced, on either kind of location.
    for uri in (f"s3://{EXPORT_BUCKET}/o2u/{job_id}/from-0.jsonl", (folder / "from-0.jsonl").as_uri()):
        refused = call_error(lambda uri=uri: _export(cluster, cluster.replicas[2], job_id, uri))
        assert (refused.code, refused.reason) == (grpc.StatusCode.ALREADY_EXISTS, "DESTINATION_EXISTS")
    outside = call_error(
        lambda: _export(cluster, cluster.replicas[1], job_id, f"s3://{EXPORT_BUCKET}/elsewhere.jsonl")
    )
    assert (outside.code, outside.reason) == (grpc.StatusCode.PERMISSION_DENIED, "EXPORT_NOT_ALLOWED")
    assert cluster.s3.get(EXPORT_BUCKET, f"o2u/{job_id}/from-0.jsonl") == written[0]


@pytest.mark.slow
def test_a_dataset_changed_before_a_takeover_fails_the_job_on_the_new_replica(
    cluster: Cluster, digits_root: Path
) -> None:
    path = digits_root / "changing" / "digits.npz"
    path.parent.mkdir(exist_ok=True)
    shutil.copyfile(digits_root / "small.npz", path)
    uri = path.as_uri()
    with cluster.stub(cluster.replicas[0]) as stub:
        job_id = create_job(stub, uri, config=LONG).job_id
    owner = cluster.wait_owner(job_id)
    with cluster.stub(cluster.others(owner)[0]) as stub:
        wait_until(
            stub, job_id, lambda job: job.progress.stage == pb.STAGE_PRETRAINING and job.progress.epoch >= 2
        )
        assert cluster.checkpoints(job_id), "the first attempt uploaded its checkpoint"
        assert get(stub, job_id).run_info.dataset_digest
        owner.signal(9)  # SIGKILL; while its lease runs out, the user changes some labels
        data = dict(np.load(path))
        data["y"][:40] = (data["y"][:40] + 1) % 10
        np.savez(path, **data)
        failed = wait_until(stub, job_id, lambda job: job.state in (SUCCEEDED, FAILED))
        stored = events(stub, job_id)
    assert failed.state == FAILED
    started = [
        event.message
        for event in stored
        if event.type == pb.JOB_EVENT_TYPE_STATE_CHANGED and event.state == pb.JOB_STATE_RUNNING
    ]
    assert len(started) == 2
    assert f"/{owner.pid}" in started[0]
    assert f"/{owner.pid}" not in started[1], "another replica ran the second attempt"
    assert (failed.error.code, failed.error.reason) == (9, "DATASET_CHANGED")  # FAILED_PRECONDITION
    assert uri in failed.error.message
    assert "submit a new job" in failed.error.message
    assert failed.attempts == 2
    assert cluster.checkpoints(job_id) == [], "the failed job's checkpoints are deleted"
