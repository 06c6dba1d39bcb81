"""A job outlives the replica that ran it: SIGKILL it and another replica takes the job over once
the lease expires, resuming from the checkpoint in object storage with the same scores as an
uninterrupted run; SIGSTOP it past its lease and, after the takeover, its writes are refused."""

from __future__ import annotations

import re
import threading
import time
from typing import Any

import pytest

from o2u.v1 import scoring_pb2 as pb
from tests.o2u_server.replicas.cluster import Cluster, events, scores, state_changes, wait_until
from tests.server_testing import create_job

# 1,797 digits, stage 2 of 32 epochs: long enough to kill or pause a replica inside it.
CONFIG: dict[str, Any] = {
    "model": "mlp",
    "seed": 11,
    "pretrain_epochs": 2,
    "cycle_length_epochs": 4,
    "num_cycles": 8,
    "pretrain_batch_size": 32,
    "cyclic_batch_size": 16,
}
RUNNING = pb.JOB_STATE_RUNNING
QUEUED = pb.JOB_STATE_QUEUED
SUCCEEDED = pb.JOB_STATE_SUCCEEDED


def _in_stage_two(job: pb.ScoringJob) -> bool:
    return job.progress.stage == pb.STAGE_CYCLIC and 2 <= job.progress.epoch <= job.progress.epochs_total - 6


def _watch_in_background(
    cluster: Cluster, replica: Any, job_id: str
) -> tuple[threading.Thread, list[pb.JobEvent]]:
    seen: list[pb.JobEvent] = []

    def watch() -> None:
        with cluster.stub(replica) as stub:
            seen.extend(events(stub, job_id))

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, seen


@pytest.mark.slow
def test_a_killed_replica_s_job_resumes_elsewhere_from_its_checkpoint(
    cluster: Cluster, digits_root: Any
) -> None:
    uri = (digits_root / "digits.npz").as_uri()
    first = cluster.replicas[0]
    with cluster.stub(first) as stub:
        reference = create_job(stub, uri, config=CONFIG, display_name="reference").job_id
        wait_until(stub, reference, lambda job: job.state == SUCCEEDED)
        expected = scores(stub, reference)
        target = create_job(stub, uri, config=CONFIG, display_name="target").job_id
    owner = cluster.wait_owner(target)
    watcher = cluster.others(owner)[0]
    watching, seen = _watch_in_background(cluster, watcher, target)  # a watch on another replica
    with cluster.stub(watcher) as stub:
        wait_until(stub, target, _in_stage_two)
        assert cluster.checkpoints(target), "the attempt uploaded its checkpoint"
        owner.signal(9)  # SIGKILL: no drain, no last write
        taker = cluster.wait_owner(target, other_than=owner)
        done = wait_until(stub, target, lambda job: job.state in (SUCCEEDED, pb.JOB_STATE_FAILED))
        assert done.state == SUCCEEDED, done.error
        assert done.attempts == 2
        assert scores(stub, target) == expected, "the resumed run differs from the uninterrupted one"
        stored = events(stub, target)
    watching.join(timeout=60)
    assert seen == stored, "the watch on a third replica saw every event, in order, through the takeover"
    assert [event.sequence for event in stored] == list(range(1, len(stored) + 1))
    assert state_changes(stored) == [QUEUED, RUNNING, QUEUED, RUNNING, SUCCEEDED]
    requeued = next(i for i, event in enumerate(stored) if i > 1 and event.state == QUEUED)
    # It trained further than any attempt before: not counted against the job's crash limit.
    assert "stopped renewing its lease (the job trained further than before" in stored[requeued].message
    assert cluster.sql("SELECT crashes FROM jobs WHERE job_id = %s", target) == [(0,)]
    assert f"/{taker.pid}" in stored[requeued + 1].message  # "attempt 2 started on <host>/<pid>"
    resumed = next(
        event.progress
        for event in stored[requeued + 2 :]
        if event.type == pb.JOB_EVENT_TYPE_PROGRESS and event.progress.stage != pb.STAGE_LOADING
    )
    assert (resumed.stage, resumed.epoch > 1) == (pb.STAGE_CYCLIC, True), "resumed inside stage 2"
    assert cluster.checkpoints(target) == [], "every checkpoint copy is deleted when the job ends"


@pytest.mark.slow
def test_a_replica_paused_past_its_lease_is_fenced_out(cluster: Cluster, digits_root: Any) -> None:
    uri = (digits_root / "digits.npz").as_uri()
    with cluster.stub(cluster.replicas[0]) as stub:
        target = create_job(stub, uri, config=CONFIG).job_id
    paused = cluster.wait_owner(target)
    with cluster.stub(cluster.others(paused)[0]) as stub:
        wait_until(stub, target, _in_stage_two)
        paused.pause()  # SIGSTOP: frozen mid-training, its lease runs out
        try:
            cluster.wait_owner(target, other_than=paused)
        finally:
            paused.resume()  # SIGCONT: it carries on with its attempt as if nothing happened
        done = wait_until(stub, target, lambda job: job.state in (SUCCEEDED, pb.JOB_STATE_FAILED))
        assert done.state == SUCCEEDED, done.error
        stored = events(stub, target)
        assert len(scores(stub, target)) == 1797, "one result set"
    assert done.attempts == 2
    assert state_changes(stored) == [QUEUED, RUNNING, QUEUED, RUNNING, SUCCEEDED]
    assert [event.sequence for event in stored] == list(range(1, len(stored) + 1))
    deadline = time.monotonic() + 60
    while _leases_lost(paused.scrape()) < 1:  # its next write (or its lease keeper) finds out
        assert time.monotonic() < deadline, paused.log_tail()
        time.sleep(0.2)
    assert "its lease is gone and another replica owns the job" in paused.log_tail(200_000)
    assert cluster.sql("SELECT count(*) FROM scores WHERE job_id = %s", target) == [(1797,)]
    assert cluster.checkpoints(target) == [], "the fenced-out attempt's checkpoint went with the job"


def _leases_lost(metrics: str) -> float:
    found = re.search(r"^o2u_job_leases_lost_total (\S+)$", metrics, re.MULTILINE)
    return float(found.group(1)) if found else 0.0
