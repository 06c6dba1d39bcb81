"""The job store on its own, on SQLite and on PostgreSQL: transitions, event sequences, results,
idempotency, recovery and locking (claims, leases and fencing: test_claims.py)."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest
from sqlalchemy import select

from o2u_server.domain import EventType, JobSpec, JobState, Progress, ScoreFilter, Stage
from o2u_server.errors import AlreadyExists, FailedPrecondition, NotFound, ResourceExhausted
from o2u_server.jobs.database import StateDirLockedError
from o2u_server.jobs.store import JobStore, LeaseLost, Recovery
from o2u_server.jobs.tables import jobs
from tests.o2u_server.jobs.store_testing import (
    INFO,
    SPEC,
    claim,
    job_id,
    lose_one_commit_reply,
    score_rows,
    summary,
)
from tests.server_testing import sqlite_integrity


def test_lifecycle_appends_one_event_per_change(store: JobStore) -> None:
    job, created = store.create_job(job_id(1), SPEC, 100.0, max_queued=10)
    assert created
    assert job.state is JobState.QUEUED
    assert job.last_sequence == 1
    lease, started, event = claim(store, now=101.0)
    assert (lease.job_id, lease.attempt, started.attempts) == (job_id(1), 1, 1)
    assert event.sequence == 2
    assert started.progress == Progress(Stage.LOADING)
    progress = Progress(Stage.PRETRAINING, epoch=1, epochs_total=2, fraction_done=0.25, mean_loss=1.5)
    assert store.claims.record_progress(lease, progress, 102.0).sequence == 3
    done = store.claims.save_results(lease, score_rows(6), ["a", "b"], summary(job_id(1)), INFO, 103.0)
    assert (done.sequence, done.state, done.terminal) == (4, JobState.SUCCEEDED, True)
    with pytest.raises(LeaseLost):  # final states are final
        store.claims.finish_job(lease, JobState.FAILED, 104.0)

    job = store.get_job(job_id(1))
    assert (job.state, job.start_time, job.end_time, job.run_info) == (JobState.SUCCEEDED, 101.0, 103.0, INFO)
    assert job.progress == progress
    events = store.events.after(job_id(1), 0)
    assert [e.sequence for e in events] == [1, 2, 3, 4]
    assert [e.type for e in events] == [EventType.STATE_CHANGED] * 2 + [
        EventType.PROGRESS,
        EventType.STATE_CHANGED,
    ]
    assert store.events.after(job_id(1), 2, until=3) == events[2:3]
    assert store.job_with_events(job_id(1), 3) == (job, events[3:])
    assert store.results.summary(job_id(1)) == summary(job_id(1))


def test_idempotency_and_queue_limit(store: JobStore) -> None:
    store.create_job(job_id(1), SPEC, 1.0, max_queued=2)
    again, created = store.create_job(job_id(2), SPEC, 2.0, max_queued=2)
    assert (again.job_id, created) == (job_id(1), False)
    other = JobSpec("file:///data/y.npz", None, {}, request_id="r-1")
    with pytest.raises(AlreadyExists):
        store.create_job(job_id(2), other, 2.0, max_queued=2)
    store.create_job(job_id(2), JobSpec("file:///data/y.npz", None, {}), 3.0, max_queued=2)
    with pytest.raises(ResourceExhausted) as full:
        store.create_job(job_id(3), JobSpec("file:///data/z.npz", None, {}), 4.0, max_queued=2)
    assert full.value.retry_after_seconds
    assert [job.job_id for _, job in store.list_jobs(None, None, 10)] == [job_id(2), job_id(1)]
    assert store.queue_stats() == (2, 1.0)


def test_one_request_id_sent_to_two_stores_at_once_yields_one_job(store: JobStore, second: JobStore) -> None:
    """Two replicas (two stores on one database) receive the same request at the same moment."""
    results: list[tuple[str, bool]] = []
    barrier = threading.Barrier(8)

    def create(replica: JobStore, n: int) -> None:
        barrier.wait()
        job, created = replica.create_job(job_id(n), SPEC, float(n), max_queued=100)
        results.append((job.job_id, created))

    threads = [threading.Thread(target=create, args=(store if n % 2 else second, n)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({created_id for created_id, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert store.state_counts()[JobState.QUEUED] == 1


def test_the_queue_limit_holds_across_stores(store: JobStore, second: JobStore) -> None:
    barrier = threading.Barrier(6)
    refused: list[int] = []

    def create(replica: JobStore, n: int) -> None:
        barrier.wait()
        try:
            replica.create_job(job_id(n), JobSpec(f"file:///d/{n}.npz", None, {}), float(n), max_queued=3)
        except ResourceExhausted:
            refused.append(n)

    threads = [threading.Thread(target=create, args=(store if n % 2 else second, n)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (len(refused), store.state_counts()[JobState.QUEUED]) == (3, 3)


def test_sequences_stay_strictly_increasing_under_concurrent_writers(
    store: JobStore, second: JobStore
) -> None:
    store.create_job(job_id(1), SPEC, 1.0, max_queued=10)
    lease, _, _ = claim(store)

    def write(replica: JobStore) -> None:
        for _ in range(40):
            replica.claims.record_progress(lease, Progress(Stage.CYCLIC), 3.0)

    threads = [threading.Thread(target=write, args=(store if n % 2 else second,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [e.sequence for e in store.events.after(job_id(1), 0)] == list(range(1, 163))


def test_score_pages_filters_and_counts(store: JobStore) -> None:
    store.create_job(job_id(1), SPEC, 1.0, max_queued=10)
    lease, _, _ = claim(store)
    store.claims.save_results(lease, score_rows(30), ["a", "b"], summary(job_id(1)), INFO, 3.0)
    page = store.results.page(job_id(1), ScoreFilter(), after_rank=10, limit=5)
    assert [row.rank for row in page] == [11, 12, 13, 14, 15]
    assert page[0].given_label_name == ["a", "b"][page[0].given_label]
    assert (page[0].key, page[0].score, page[0].suspected) == ("k19", 19.0, False)
    assert store.results.count(job_id(1), ScoreFilter(top_k=7)) == 7
    assert store.results.count(job_id(1), ScoreFilter(only_suspected=True)) == 10
    assert store.results.count(job_id(1), ScoreFilter(min_score=25.0)) == 5
    assert store.results.count(job_id(1), ScoreFilter(top_k=20, only_suspected=True, min_score=22.0)) == 8
    assert [row.rank for row in store.results.iterate(job_id(1), ScoreFilter(only_suspected=True))] == list(
        range(1, 11)
    )


def test_scores_read_while_their_job_is_deleted_end_in_not_found(store: JobStore) -> None:
    """An export reads the scores a page at a time; a delete between two pages leaves the next one
    empty, which must not read as the end of the scores (a short file, reported as complete)."""
    store.create_job(job_id(1), SPEC, 1.0, max_queued=10)
    lease, _, _ = claim(store)
    store.claims.save_results(lease, score_rows(30), ["a", "b"], summary(job_id(1)), INFO, 3.0)
    rows = store.results.iterate(job_id(1), ScoreFilter(), batch=10)
    assert [next(rows).rank for _ in range(10)] == list(range(1, 11))
    store.delete_job(job_id(1))
    with pytest.raises(NotFound, match="does not exist"):
        list(rows)


def test_score_reads_bind_each_calls_values_and_jobs(store: JobStore) -> None:
    """The reads are built once per filter shape: each call's values and job must still be its own."""
    for n in (1, 2):
        store.create_job(job_id(n), JobSpec(f"file:///data/{n}.npz", None, {}), 1.0, max_queued=10)
        lease, _, _ = claim(store)
        store.claims.save_results(
            lease, score_rows(10 * n), [f"x{n}", f"y{n}"], summary(job_id(n)), INFO, 3.0
        )
    results = store.results
    assert [results.count(job_id(n), ScoreFilter(top_k=k)) for n in (1, 2) for k in (3, 15)] == [3, 10, 3, 15]
    assert [results.count(job_id(2), ScoreFilter(min_score=m)) for m in (15.0, 5.0)] == [5, 15]
    assert [len(results.page(job_id(2), ScoreFilter(), 0, limit)) for limit in (4, 9)] == [4, 9]
    names = {row.given_label_name for row in results.page(job_id(2), ScoreFilter(), 0, 20)}
    assert names == {"x2", "y2"}
    assert [job.job_id for _, job in store.list_jobs(None, None, 1)] == [job_id(2)]
    assert [job.job_id for _, job in store.list_jobs(None, None, 5)] == [job_id(2), job_id(1)]


def test_many_scores_are_bulk_loaded_and_paged_by_rank(store: JobStore) -> None:
    store.create_job(job_id(1), SPEC, 1.0, max_queued=10)
    lease, _, _ = claim(store)
    store.claims.save_results(lease, score_rows(25_000), ["a", "b"], summary(job_id(1)), INFO, 3.0)
    assert store.results.count(job_id(1), ScoreFilter()) == 25_000
    ranks = [row.rank for row in store.results.iterate(job_id(1), ScoreFilter(), batch=7_000)]
    assert ranks == list(range(1, 25_001))
    last = store.results.page(job_id(1), ScoreFilter(), after_rank=24_998, limit=10)
    assert [(row.rank, row.sample_id, row.key) for row in last] == [(24_999, 1, "k1"), (25_000, 0, "k0")]


def test_cancel_and_delete(store: JobStore) -> None:
    store.create_job(job_id(1), SPEC, 1.0, max_queued=10)
    job, event = store.request_cancel(job_id(1), 2.0)
    assert job.state is JobState.CANCELLED
    assert event is not None
    assert event.terminal

    store.create_job(job_id(2), JobSpec("file:///d/y.npz", None, {}), 3.0, max_queued=10)
    claim(store)
    job, event = store.request_cancel(job_id(2), 5.0)
    assert job.state is JobState.RUNNING
    assert event is None
    with pytest.raises(FailedPrecondition):
        store.delete_job(job_id(2))

    store.delete_job(job_id(1))
    with pytest.raises(NotFound):
        store.get_job(job_id(1))
    assert store.events.after(job_id(1), 0) == []


def test_recovery_requeues_counts_crashes_and_honours_cancels(store: JobStore) -> None:
    for n in (1, 2, 3):
        store.create_job(job_id(n), JobSpec(f"file:///d/{n}.npz", None, {}), float(n), max_queued=10)
    claim(store)  # job 1, running when the process died
    claim(store)  # job 2
    store.request_cancel(job_id(2), 6.0)  # cancel requested, never acted on

    recovery = store.claims.recover(7.0, max_attempts=2)
    assert recovery.queued == [job_id(1)]
    assert recovery.finished == [JobState.CANCELLED]
    assert [event.state for event in recovery.events] == [JobState.QUEUED, JobState.CANCELLED]
    assert store.get_job(job_id(2)).state is JobState.CANCELLED

    lease, _, _ = claim(store)  # job 1 again (older than job 3), and it crashes again, no further
    assert (lease.job_id, lease.attempt) == (job_id(1), 2)
    recovery = store.claims.recover(9.0, max_attempts=2)
    assert (recovery.queued, recovery.finished) == ([], [JobState.FAILED])
    failed = store.get_job(job_id(1))
    assert failed.error is not None
    assert (failed.error.code, failed.error.reason) == (13, "TOO_MANY_ATTEMPTS")
    assert "2 times in a row" in failed.error.message
    assert "file:///d/1.npz" in failed.error.message  # names the dataset...
    assert "while it loaded the dataset" in failed.error.message  # ...and where the server died
    assert failed.attempts == 2
    assert store.get_job(job_id(3)).state is JobState.QUEUED


def _crashes(store: JobStore, job: str) -> int:
    with store.db.read() as conn:
        return int(conn.execute(select(jobs.c.crashes).where(jobs.c.job_id == job)).scalar_one())


@pytest.mark.parametrize("crash", ["restart", "lease"])
def test_crashes_count_only_when_the_job_got_no_further(store: JobStore, crash: str) -> None:
    """The same rule for a server that died (recovered at start) and for a lease that expired and
    was reclaimed by another replica."""

    def crashed(now: float) -> Recovery:
        if crash == "restart":
            return store.claims.recover(now, max_attempts=2)
        return store.claims.requeue_expired(now, max_attempts=2)

    lease_seconds = 60.0 if crash == "restart" else -1.0  # -1: expired as soon as it is granted
    store.create_job(job_id(1), JobSpec("file:///d/1.npz", None, {}), 1.0, max_queued=10)
    now = 2.0
    for epoch in range(1, 6):  # five crashes, each after one more epoch than the attempt before
        lease, _, _ = claim(store, f"replica-{epoch}", now=now, lease_seconds=60.0)
        store.claims.record_progress(lease, Progress(Stage.PRETRAINING, epoch=epoch, epochs_total=9), now)
        if crash == "lease":  # the replica froze: its lease runs out, another replica requeues it
            store.claims.renew_lease(lease, lease_seconds)
        recovery = crashed(now + 0.5)
        assert recovery.queued == [job_id(1)]
        assert "does not count against it" in (recovery.events[0].message or "")
        now += 1.0
    assert _crashes(store, job_id(1)) == 0
    for _ in (1, 2):  # resumed from epoch 4's checkpoint, it dies at the same epoch 5 twice
        lease, _, _ = claim(store, now=now, lease_seconds=60.0)
        store.claims.record_progress(lease, Progress(Stage.PRETRAINING, epoch=5, epochs_total=9), now)
        if crash == "lease":
            store.claims.renew_lease(lease, lease_seconds)
        recovery = crashed(now + 0.5)
        now += 1.0
    assert recovery.finished == [JobState.FAILED]
    failed = store.get_job(job_id(1))
    assert failed.error is not None
    assert "in stage 1 (pre-training) after epoch 5 of 9" in failed.error.message
    assert (failed.attempts, _crashes(store, job_id(1))) == (7, 2)


def test_the_state_dir_is_locked_and_reopens_with_its_secret(tmp_path: Path) -> None:
    first = JobStore(tmp_path / "jobs.sqlite3")
    first.open()
    secret = first.page_token_secret
    second = JobStore(tmp_path / "jobs.sqlite3")
    with pytest.raises(StateDirLockedError):
        second.open()
    first.close()
    second.open()
    assert second.page_token_secret == secret
    assert len(secret) == 32
    second.close()
    assert sqlite_integrity(tmp_path / "jobs.sqlite3") == "ok"


def test_replicas_of_one_database_share_its_secret(store: JobStore, second: JobStore) -> None:
    assert store.page_token_secret == second.page_token_secret


def test_a_delete_whose_reply_was_lost_is_done(store: JobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """The connection breaks after the COMMIT of a delete, before its reply: the retry finds no job.
    It deleted it itself, so the call succeeds (the caller would otherwise get NOT_FOUND, and the
    server would skip removing the job's checkpoints)."""
    store.create_job(job_id(1), SPEC, 1.0, max_queued=10)
    lease, _, _ = claim(store)
    store.claims.finish_job(lease, JobState.CANCELLED, 2.0, message="cancelled")
    broken = lose_one_commit_reply(store, monkeypatch)
    store.delete_job(job_id(1))
    assert broken == [True]
    with pytest.raises(NotFound):
        store.get_job(job_id(1))
    with pytest.raises(NotFound):  # a delete of a job that is gone is still NOT_FOUND
        store.delete_job(job_id(1))


def test_a_create_whose_reply_was_lost_returns_the_job_it_made(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection breaks after the COMMIT of a new job, before its reply: the retried insert
    meets its own job_id. The call returns that job, created, even without a request id."""
    broken = lose_one_commit_reply(store, monkeypatch)
    spec = dataclasses.replace(SPEC, request_id=None)
    job, created = store.create_job(job_id(1), spec, 5.0, max_queued=10)
    assert broken == [True]
    assert created
    assert (job.job_id, job.state) == (job_id(1), JobState.QUEUED)
    assert [j.job_id for _, j in store.list_jobs(None, None, 10)] == [job_id(1)]
