"""One queue, three replicas: jobs submitted anywhere run once, somewhere; a request_id sent to two
replicas at once names one job; any replica watches or cancels a job that runs on another; and
a database restart in the middle of a job loses nothing."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest

from o2u.v1 import scoring_pb2 as pb
from tests.o2u_server.replicas.cluster import Cluster, events, get, scores, state_changes, wait_until
from tests.server_testing import SLOW_CONFIG, TINY_CONFIG, create_job

QUEUED, RUNNING = pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING
SUCCEEDED, CANCELLED = pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_CANCELLED
SMALL: dict[str, Any] = {**TINY_CONFIG, "pretrain_epochs": 4, "num_cycles": 2}  # 400 digits, ~2 s
# Epochs of a few hundred batches each: a cancel lands inside one.
ENDLESS: dict[str, Any] = {**SLOW_CONFIG, "pretrain_batch_size": 8}


def test_jobs_submitted_across_replicas_run_once_on_more_than_one(
    cluster: Cluster, digits_root: Path
) -> None:
    uri = (digits_root / "small.npz").as_uri()
    submitted = []
    for n in range(6):
        with cluster.stub(cluster.replicas[n % 3]) as stub:
            submitted.append(create_job(stub, uri, config=SMALL, request_id=str(uuid.uuid4())).job_id)
    with cluster.stub(cluster.replicas[2]) as stub:
        for job_id in submitted:
            done = wait_until(stub, job_id, lambda job: job.state in (SUCCEEDED, pb.JOB_STATE_FAILED))
            assert (done.state, done.attempts) == (SUCCEEDED, 1), done.error
            stored = events(stub, job_id)
            assert state_changes(stored) == [QUEUED, RUNNING, SUCCEEDED]
            assert len(scores(stub, job_id)) == 400
    rows = cluster.sql("SELECT job_id, lease_owner FROM jobs WHERE job_id = ANY(%s)", submitted)
    assert sorted(job_id for job_id, _ in rows) == sorted(submitted), "each job once, none lost"
    assert len({owner for _, owner in rows}) > 1, "the jobs ran on more than one replica"


def test_one_request_id_sent_to_two_replicas_at_once_is_one_job(cluster: Cluster, digits_root: Path) -> None:
    uri = (digits_root / "small.npz").as_uri()
    request_id = str(uuid.uuid4())
    barrier = threading.Barrier(4)
    answers: list[str] = []

    def submit(replica_index: int) -> None:
        with cluster.stub(cluster.replicas[replica_index]) as stub:
            barrier.wait()
            answers.append(create_job(stub, uri, config=SMALL, request_id=request_id).job_id)

    threads = [threading.Thread(target=submit, args=(n % 2,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(answers) == 4
    assert len(set(answers)) == 1
    assert cluster.sql("SELECT count(*) FROM jobs WHERE request_id = %s", request_id) == [(1,)]
    with cluster.stub(cluster.replicas[2]) as stub:
        assert wait_until(stub, answers[0], lambda job: job.state == SUCCEEDED)


def test_watch_and_cancel_from_other_replicas(cluster: Cluster, digits_root: Path) -> None:
    """Watched on replica A while it runs on B, the watch resumes on C after A is killed, and a
    cancel sent to C stops the job on B within the epoch it was in."""
    uri = (digits_root / "digits.npz").as_uri()
    with cluster.stub(cluster.replicas[0]) as stub:
        job_id = create_job(stub, uri, config=ENDLESS).job_id
    runner = cluster.wait_owner(job_id)
    watcher, other = cluster.others(runner)
    seen: list[pb.JobEvent] = []
    with cluster.stub(watcher) as stub:
        stream = stub.WatchScoringJob(pb.WatchScoringJobRequest(job_id=job_id), timeout=120)
        for response in stream:
            seen.append(response.event)
            if sum(event.type == pb.JOB_EVENT_TYPE_PROGRESS for event in seen) == 3:
                break
        watcher.signal(9)  # the watching replica dies under the stream
        with pytest.raises(grpc.RpcError) as broken:
            seen.extend(response.event for response in stream)
        assert broken.value.code() is grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    with cluster.stub(other) as stub:
        resumed = stub.WatchScoringJob(
            pb.WatchScoringJobRequest(job_id=job_id, after_sequence=seen[-1].sequence), timeout=120
        )
        seen.append(next(resumed).event)
        cancelled_at = get(stub, job_id).progress.epoch
        assert stub.CancelScoringJob(pb.CancelScoringJobRequest(job_id=job_id)).job.state == RUNNING
        seen.extend(response.event for response in resumed)  # until the final state
        final = get(stub, job_id)
    assert cluster.owner(job_id) is None
    assert [event.sequence for event in seen] == list(range(1, len(seen) + 1)), "in order, no gap, no repeat"
    assert state_changes(seen) == [QUEUED, RUNNING, CANCELLED]
    assert final.state == CANCELLED
    assert final.progress.epoch <= cancelled_at + 1, "stopped within the epoch it was in"
    assert final.progress.epoch < final.progress.epochs_total


def test_a_database_restart_mid_job_loses_nothing(cluster: Cluster, digits_root: Path) -> None:
    uri = (digits_root / "digits.npz").as_uri()
    config = {**SMALL, "pretrain_epochs": 6, "num_cycles": 3}
    with cluster.stub(cluster.replicas[0]) as stub:
        job_id = create_job(stub, uri, config=config).job_id
    runner = cluster.wait_owner(job_id)
    watcher = cluster.others(runner)[0]
    seen: list[pb.JobEvent] = []

    def watch() -> None:
        with cluster.stub(watcher) as stub:
            seen.extend(events(stub, job_id))

    watching = threading.Thread(target=watch, daemon=True)
    watching.start()
    with cluster.stub(watcher) as stub:
        wait_until(
            stub, job_id, lambda job: job.progress.epoch >= 2 and job.progress.stage == pb.STAGE_PRETRAINING
        )
        cluster.postgres.restart()  # every connection of every replica is cut
        done = wait_until(stub, job_id, lambda job: job.state in (SUCCEEDED, pb.JOB_STATE_FAILED))
        assert (done.state, done.attempts) == (SUCCEEDED, 1), done.error
        stored = events(stub, job_id)
        assert len(scores(stub, job_id)) == 1797
        # The replicas took new work after the restart, too.
        after = create_job(stub, (digits_root / "small.npz").as_uri(), config=SMALL).job_id
        assert wait_until(stub, after, lambda job: job.state == SUCCEEDED).attempts == 1
    watching.join(timeout=60)
    assert seen == stored
    assert [event.sequence for event in stored] == list(range(1, len(stored) + 1))
    assert state_changes(stored) == [QUEUED, RUNNING, SUCCEEDED]
    epochs = {
        (event.progress.stage, event.progress.epoch)
        for event in stored
        if event.type == pb.JOB_EVENT_TYPE_PROGRESS
    }
    expected = {(pb.STAGE_PRETRAINING, n) for n in range(1, 7)} | {(pb.STAGE_CYCLIC, n) for n in range(1, 7)}
    assert expected <= epochs, "every epoch's progress event was stored"


def _store_up_everywhere(cluster: Cluster, expected: float, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while {replica.gauge("o2u_job_store_up") for replica in cluster.replicas} != {expected}:
        assert time.monotonic() < deadline, f"o2u_job_store_up did not become {expected} on every replica"
        time.sleep(0.2)


def test_every_replica_reports_the_database_down_and_back(cluster: Cluster) -> None:
    """o2u_job_store_up, which O2UJobStoreUnreachable alerts on: 0 on every replica within a lease
    round of the database stopping (health stays SERVING, so nothing else would say it), 1 again
    once it is back, without a restart."""
    _store_up_everywhere(cluster, 1.0)
    cluster.postgres.stop()
    try:
        _store_up_everywhere(cluster, 0.0)
    finally:
        cluster.postgres.start()
    _store_up_everywhere(cluster, 1.0)
