"""Owners in the job store, on SQLite and PostgreSQL: request_id per owner, listings by owner, and a
per-owner quota that holds when two replicas admit jobs at the same moment."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import pytest

from o2u_server.jobs.quotas import QuotaExceeded
from o2u_server.jobs.store import JobStore
from tests.o2u_server.jobs.store_testing import SPEC, job_id

ALICE = dataclasses.replace(SPEC, owner="alice")
BOB = dataclasses.replace(SPEC, owner="bob")


def test_a_request_id_names_one_job_per_owner(store: JobStore) -> None:
    a, created_a = store.create_job(job_id(1), ALICE, 1.0, max_queued=10)
    b, created_b = store.create_job(job_id(2), BOB, 1.0, max_queued=10)
    assert created_a
    assert created_b
    assert a.job_id != b.job_id
    again, created = store.create_job(job_id(3), ALICE, 2.0, max_queued=10)
    assert (again.job_id, created) == (a.job_id, False)
    assert store.job_for_request(BOB) == b
    assert [job.spec.owner for _, job in store.list_jobs(None, None, 10, "alice")] == ["alice"]
    assert {job.spec.owner for _, job in store.list_jobs(None, None, 10)} == {"alice", "bob"}


def test_the_owner_quota_holds_across_replicas(store: JobStore, second: JobStore) -> None:
    def admit(n: int) -> bool:
        spec = dataclasses.replace(ALICE, request_id=f"r-{n}")
        try:
            (store if n % 2 else second).create_job(job_id(n), spec, 1.0, max_queued=100, max_per_owner=3)
        except QuotaExceeded:
            return False
        return True

    with ThreadPoolExecutor(8) as pool:
        admitted = list(pool.map(admit, range(1, 13)))
    assert sum(admitted) == 3
    with pytest.raises(QuotaExceeded, match="limit per principal is 3") as raised:
        second.create_job(
            job_id(50), dataclasses.replace(ALICE, request_id="late"), 1.0, max_queued=100, max_per_owner=3
        )
    assert raised.value.quota == ("principal:alice", "at most 3 queued or running jobs per principal")
    # Another owner has its own quota; a cancelled job no longer counts.
    store.create_job(job_id(60), BOB, 1.0, max_queued=100, max_per_owner=3)
    queued = [job for _, job in store.list_jobs(None, None, 10, "alice")]
    store.request_cancel(queued[0].job_id, 2.0)
    store.create_job(
        job_id(70), dataclasses.replace(ALICE, request_id="after"), 3.0, max_queued=100, max_per_owner=3
    )
