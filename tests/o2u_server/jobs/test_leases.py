"""The lease keeper and this replica's running attempts, on a real job store (SQLite and
PostgreSQL): an attempt that outlives its lease, with the job claimed again by another worker of
the same replica, must not take the new attempt out of the keeper's hands when it exits."""

from __future__ import annotations

import time

from o2u_server.domain import JobState, Progress, Stage
from o2u_server.jobs.leases import Attempts, LeaseKeeper
from o2u_server.jobs.store import JobStore
from tests.o2u_server.jobs.store_testing import SPEC, job_id

LEASE_SECONDS = 1.0


def test_a_stale_attempt_s_exit_leaves_the_new_attempt_renewed(store: JobStore) -> None:
    store.create_job(job_id(1), SPEC, time.time(), max_queued=10)
    attempts = Attempts()
    keeper = LeaseKeeper(
        store.claims, attempts, lease_seconds=LEASE_SECONDS, max_attempts=3, after_round=lambda r: None
    )
    claimed = store.claims.claim_job("replica-1", time.time(), lease_seconds=LEASE_SECONDS)
    assert claimed is not None
    first = attempts.add(claimed[0])
    time.sleep(LEASE_SECONDS + 0.2)  # the keeper held up past the lease (a long write, a pause)
    keeper.round()  # the lease is found lost, and the job requeued
    assert first.lost.is_set()
    assert store.get_job(job_id(1)).state is JobState.QUEUED
    again = store.claims.claim_job("replica-1", time.time(), lease_seconds=LEASE_SECONDS)
    assert again is not None
    second_lease = again[0]
    second = attempts.add(second_lease)  # another worker here, before the first one has stopped
    attempts.remove(claimed[0])  # the first attempt's worker exits
    assert attempts.leases() == [second_lease]
    for _ in range(6):  # two leases' time: the keeper renews the new attempt throughout
        time.sleep(LEASE_SECONDS / 3)
        keeper.round()
    assert not second.lost.is_set()
    assert store.get_job(job_id(1)).state is JobState.RUNNING
    store.claims.record_progress(
        second_lease, Progress(Stage.PRETRAINING, epoch=1, epochs_total=5), time.time()
    )
    attempts.remove(second_lease)
    assert attempts.leases() == []


def test_a_new_attempt_flags_the_one_it_replaces_as_lost(store: JobStore) -> None:
    store.create_job(job_id(2), SPEC, time.time(), max_queued=10)
    attempts = Attempts()
    claimed = store.claims.claim_job("replica-1", time.time(), lease_seconds=LEASE_SECONDS)
    assert claimed is not None
    first = attempts.add(claimed[0])
    time.sleep(LEASE_SECONDS + 0.2)
    store.claims.requeue_expired(time.time(), max_attempts=3)
    again = store.claims.claim_job("replica-1", time.time(), lease_seconds=LEASE_SECONDS)
    assert again is not None
    assert not first.lost.is_set()  # no keeper round yet
    attempts.add(again[0])
    assert first.lost.is_set(), "the store gave the job to the new attempt: the old one writes nothing"
