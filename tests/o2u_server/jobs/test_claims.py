"""Claims under a lease and fenced writes, on SQLite and PostgreSQL: replicas never claim the same
job, a lease that expired hands the job to the next claim, and every write of an attempt that lost
its lease is refused without touching what the new owner wrote.

A lease claimed with a negative duration has already expired on the database's clock: that is how
these tests make a replica "pause past its lease" without waiting for one."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from o2u_server.domain import (
    EventType,
    JobError,
    JobSpec,
    JobState,
    Progress,
    RunInfo,
    ScoreFilter,
    ScoreTuple,
    Stage,
)
from o2u_server.jobs import claims
from o2u_server.jobs.store import JobStore, Lease, LeaseLost
from o2u_server.jobs.tables import jobs
from tests.o2u_server.jobs.store_testing import (
    INFO,
    claim,
    job_id,
    lose_one_commit_reply,
    score_rows,
    summary,
)

EXPIRED = -1.0  # lease_seconds of a lease that is over as soon as it is granted


def _queue(store: JobStore, count: int) -> None:
    for n in range(1, count + 1):
        store.create_job(job_id(n), JobSpec(f"file:///d/{n}.npz", None, {}), float(n), max_queued=100)


def test_concurrent_claims_take_each_job_exactly_once(store: JobStore, second: JobStore) -> None:
    _queue(store, 12)
    claimed: list[Lease] = []
    barrier = threading.Barrier(6)

    def work(replica: JobStore, owner: str) -> None:
        barrier.wait()
        while (found := replica.claims.claim_job(owner, 5.0, lease_seconds=60)) is not None:
            claimed.append(found[0])

    threads = [
        threading.Thread(target=work, args=(store if n % 2 else second, f"replica-{n}")) for n in range(6)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(lease.job_id for lease in claimed) == [job_id(n) for n in range(1, 13)]
    assert {lease.attempt for lease in claimed} == {1}
    assert store.state_counts()[JobState.RUNNING] == 12


def test_claims_take_the_oldest_job_first(store: JobStore) -> None:
    _queue(store, 3)
    assert [claim(store)[0].job_id for _ in range(3)] == [job_id(1), job_id(2), job_id(3)]
    assert store.claims.claim_job("replica-a", 3.0, lease_seconds=60) is None


def test_a_paused_replica_is_fenced_out_after_a_takeover(store: JobStore, second: JobStore) -> None:
    _queue(store, 1)
    stale, _, _ = claim(store, "replica-a", lease_seconds=EXPIRED)
    recovery = second.claims.requeue_expired(10.0, max_attempts=3)
    assert recovery.queued == [job_id(1)]
    assert recovery.events[0].message.startswith(
        "replica-a stopped renewing its lease (crash 1 of 3 allowed without progress)"
    )
    owner, job, _ = claim(second, "replica-b", now=11.0)
    assert (owner.attempt, job.attempts) == (2, 2)
    second.claims.record_progress(owner, Progress(Stage.CYCLIC, epoch=3), 12.0)
    before = second.get_job(job_id(1))

    # The paused replica wakes up and carries on with its attempt: every write is refused.
    writes = [
        lambda: store.claims.record_progress(stale, Progress(Stage.CYCLIC, epoch=9), 13.0),
        lambda: store.claims.set_run_info(stale, RunInfo(9, "x", "x", "x", 1, 1, "{}", "x", "x"), 13.0),
        lambda: store.claims.save_results(stale, score_rows(4), ["a", "b"], summary(job_id(1)), INFO, 13.0),
        lambda: store.claims.finish_job(stale, JobState.FAILED, 13.0, error=JobError(13, "x", "X")),
        lambda: store.claims.release_job(stale, 13.0, message="stopping"),
    ]
    for write in writes:
        with pytest.raises(LeaseLost):
            write()
    assert store.claims.renew_lease(stale, 60) is None
    assert second.get_job(job_id(1)) == before
    assert second.results.count(job_id(1), ScoreFilter()) == 0

    second.claims.save_results(owner, score_rows(4), ["a", "b"], summary(job_id(1)), INFO, 14.0)
    done = second.get_job(job_id(1))
    assert (done.state, done.attempts) == (JobState.SUCCEEDED, 2)
    states = [e.state for e in second.events.after(job_id(1), 0) if e.type.value == "state_changed"]
    assert states == [
        JobState.QUEUED,
        JobState.RUNNING,
        JobState.QUEUED,
        JobState.RUNNING,
        JobState.SUCCEEDED,
    ]


def test_an_expired_lease_refuses_writes_even_before_a_takeover(store: JobStore) -> None:
    _queue(store, 1)
    stale, _, _ = claim(store, lease_seconds=EXPIRED)
    with pytest.raises(LeaseLost):
        store.claims.record_progress(stale, Progress(Stage.PRETRAINING), 3.0)
    assert store.get_job(job_id(1)).last_sequence == 2


def test_renewals_keep_a_lease_and_carry_cancel_requests(store: JobStore, second: JobStore) -> None:
    _queue(store, 1)
    lease, _, _ = claim(store, lease_seconds=60)
    assert store.claims.renew_lease(lease, 60) is False
    assert second.claims.requeue_expired(3.0, max_attempts=3).queued == []  # a live lease stays
    second.request_cancel(job_id(1), 4.0)  # on another replica
    assert store.claims.renew_lease(lease, 60) is True
    event = store.claims.release_job(lease, 5.0, message="shutting down")
    assert event.state is JobState.CANCELLED  # a cancel that was pending wins over the requeue


def test_a_drained_job_goes_back_to_the_queue_for_any_replica(store: JobStore, second: JobStore) -> None:
    _queue(store, 1)
    lease, _, _ = claim(store, "replica-a")
    assert store.claims.release_job(lease, 3.0, message="shutting down").state is JobState.QUEUED
    resumed, job, _ = claim(second, "replica-b")
    assert (resumed.attempt, job.state) == (2, JobState.RUNNING)
    with pytest.raises(LeaseLost):  # the released lease is over
        store.claims.record_progress(lease, Progress(Stage.PRETRAINING), 4.0)


def test_expired_leases_count_as_crashes_up_to_the_limit(store: JobStore) -> None:
    _queue(store, 1)
    for attempt in (1, 2):
        lease, _, _ = claim(store, f"replica-{attempt}", lease_seconds=EXPIRED)
        assert lease.attempt == attempt
        recovery = store.claims.requeue_expired(5.0, max_attempts=2)
    assert (recovery.queued, recovery.finished) == ([], [JobState.FAILED])
    failed = store.get_job(job_id(1))
    assert failed.error is not None
    assert (failed.error.code, failed.error.reason) == (13, "TOO_MANY_ATTEMPTS")
    assert "stopped renewing its lease) 2 times in a row" in failed.error.message
    assert "while it loaded the dataset (dataset file:///d/1.npz)" in failed.error.message


def test_worker_failures_requeue_the_job_until_they_stop_making_progress(store: JobStore) -> None:
    _queue(store, 1)
    cause = "training worker 1 of 2 was killed by signal 9 before the run ended"
    lease, _, _ = claim(store, "replica-a", lease_seconds=60)
    store.claims.record_progress(lease, Progress(Stage.PRETRAINING, epoch=2, epochs_total=8), 3.0)
    event = store.claims.retry_job(lease, 4.0, cause=cause, max_attempts=2)
    assert event.state is JobState.QUEUED  # it trained further than any earlier attempt: not counted
    assert event.message == (
        f"{cause} (the job trained further than before, so this does not count against it); "
        "it resumes from its last checkpoint"
    )
    with pytest.raises(LeaseLost):  # the failed attempt's lease is over
        store.claims.record_progress(lease, Progress(Stage.PRETRAINING, epoch=3), 4.5)
    for attempt in (2, 3):  # these fail before they finish an epoch: counted, 2 of 2 fails the job
        lease, _, _ = claim(store, "replica-a", lease_seconds=60)
        assert lease.attempt == attempt
        event = store.claims.retry_job(lease, 5.0 + attempt, cause=cause, max_attempts=2)
        assert event.state is (JobState.QUEUED if attempt == 2 else JobState.FAILED)
        if attempt == 2:
            assert event.message.startswith(f"{cause} (crash 1 of 2 allowed without progress)")
    failed = store.get_job(job_id(1))
    assert failed.error is not None
    assert (failed.error.code, failed.error.reason) == (13, "TRAINING_WORKER_FAILED")
    assert failed.error.message.startswith(
        "a training worker of this job failed 2 times in a row, each time "
    )
    assert "while it loaded the dataset (dataset file:///d/1.npz)" in failed.error.message
    assert f"the last failure: {cause}." in failed.error.message


def test_a_worker_failure_with_a_pending_cancel_cancels_the_job(store: JobStore, second: JobStore) -> None:
    _queue(store, 1)
    lease, _, _ = claim(store, lease_seconds=60)
    second.request_cancel(job_id(1), 3.0)
    event = store.claims.retry_job(lease, 4.0, cause="worker died", max_attempts=3)
    assert event.state is JobState.CANCELLED


@pytest.mark.parametrize("ending", ["succeeded", "cancelled", "released", "retried"])
def test_a_write_ending_an_attempt_whose_reply_was_lost_is_the_attempt_s_own(
    store: JobStore, monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    """The connection breaks after the COMMIT that ends an attempt (a final state, or the job back
    in the queue after a drain or a worker's failure), before its reply: the store retries the
    transaction, whose fence now finds the lease gone. That is this attempt's own write, not a lost
    lease (only PostgreSQL connections break and are retried)."""
    _queue(store, 1)
    lease, _, _ = claim(store, "replica-a", lease_seconds=60.0)
    broken = lose_one_commit_reply(store, monkeypatch)
    if ending == "succeeded":
        event = store.claims.save_results(lease, score_rows(4), ["a", "b"], summary(job_id(1)), INFO, 13.0)
    elif ending == "cancelled":
        event = store.claims.finish_job(lease, JobState.CANCELLED, 13.0, message="cancelled")
    elif ending == "released":
        event = store.claims.release_job(lease, 13.0, message="the server is stopping")
    else:
        event = store.claims.retry_job(lease, 13.0, cause="worker 1 was killed", max_attempts=3)
    assert broken == [True]
    expected = {"succeeded": JobState.SUCCEEDED, "cancelled": JobState.CANCELLED}.get(ending, JobState.QUEUED)
    assert event.state is expected
    assert store.get_job(job_id(1)).state is expected
    assert event == store.events.after(job_id(1), 0)[-1]
    with pytest.raises(LeaseLost):  # a later try of the same write is still refused
        store.claims.finish_job(lease, JobState.FAILED, 14.0, message="again")


def test_a_claim_whose_reply_was_lost_returns_the_job_it_claimed(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection breaks after the COMMIT of a claim, before its reply: the retry must return
    that job, not claim the next one and leave the first RUNNING under a lease nobody renews."""
    _queue(store, 2)
    broken = lose_one_commit_reply(store, monkeypatch)
    claimed = store.claims.claim_job("replica-a", 12.0, lease_seconds=60.0)
    assert broken == [True]
    assert claimed is not None
    lease, job, event = claimed
    assert (lease.job_id, lease.attempt, job.state, event.state) == (
        job_id(1),
        1,
        JobState.RUNNING,
        JobState.RUNNING,
    )
    assert store.get_job(job_id(2)).state is JobState.QUEUED, "one claim, one job"
    assert event == store.events.after(job_id(1), 0)[-1]


def test_a_progress_event_whose_reply_was_lost_is_recorded_once(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    _queue(store, 1)
    lease, _, _ = claim(store, "replica-a", lease_seconds=60.0)
    broken = lose_one_commit_reply(store, monkeypatch, durable_only=False)
    progress = Progress(stage=Stage.PRETRAINING, epoch=1, epochs_total=4, mean_loss=2.25, fraction_done=0.25)
    event = store.claims.record_progress(lease, progress, 12.0)
    assert broken == [True]
    stored = store.events.after(job_id(1), 0)
    assert [e.progress for e in stored if e.type is EventType.PROGRESS] == [progress], "once, not twice"
    assert event == stored[-1]


def test_a_renewal_does_not_wait_for_a_job_row_another_write_holds(store: JobStore) -> None:
    """While an attempt's long final write holds its job row, the keeper must still reach the other
    jobs' leases in time: on PostgreSQL the held row is skipped this round, not waited for."""
    if not store.db.postgresql:
        pytest.skip("SQLite has one writer at a time: a renewal waits for any write")
    _queue(store, 2)
    busy, _, _ = claim(store, "replica-a", lease_seconds=60.0)
    other, _, _ = claim(store, "replica-a", lease_seconds=60.0)
    locked = threading.Event()
    release = threading.Event()

    def hold_the_row() -> None:
        with store.db.write() as conn:
            conn.execute(select(jobs.c.job_id).where(jobs.c.job_id == busy.job_id).with_for_update())
            locked.set()
            release.wait(30)

    holder = threading.Thread(target=hold_the_row)
    holder.start()
    try:
        assert locked.wait(10)
        renewed: list[bool | None] = []
        renewal = threading.Thread(
            target=lambda: renewed.extend(store.claims.renew_lease(held, 60) for held in (busy, other))
        )
        renewal.start()
        renewal.join(10)
        assert not renewal.is_alive(), "the renewal waited for the held row"
        assert renewed == [False, False]  # the busy one is not lost, only not renewed this round
    finally:
        release.set()
        holder.join(10)
    assert store.claims.renew_lease(busy, 60) is False


def _lease_expiry(store: JobStore, lease: Lease) -> float:
    with store.db.read() as conn:
        return float(
            conn.execute(select(jobs.c.lease_expires_at).where(jobs.c.job_id == lease.job_id)).scalar_one()
        )


def test_leases_are_renewed_while_a_job_s_scores_are_written(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Storing millions of scores takes seconds. Halfway through, the keeper renews both the saving
    job's lease and another running job's: neither renewal may wait for the save to commit, and
    both leases are really extended (the scores go in steps; between them SQLite's one write lock,
    and on PostgreSQL the job's row, are free)."""
    monkeypatch.setattr(claims, "STAGE_ROWS", 1_000)
    _queue(store, 2)
    saving, _, _ = claim(store, "replica-a", lease_seconds=60.0)
    other, _, _ = claim(store, "replica-a", lease_seconds=60.0)
    before = _lease_expiry(store, other)
    renewed: list[bool | None] = []
    extended: list[float] = []  # the saving job's lease, as the renewal left it

    def rows_renewing_halfway() -> Iterator[ScoreTuple]:
        for row in score_rows(3_000):
            if row[0] == 1_500:
                renewal = threading.Thread(
                    target=lambda: renewed.extend(
                        store.claims.renew_lease(held, 120) for held in (saving, other)
                    )
                )
                renewal.start()
                renewal.join(10)
                assert not renewal.is_alive(), "the renewal waited for the scores to be stored"
                extended.append(_lease_expiry(store, saving))
            yield row

    event = store.claims.save_results(
        saving, rows_renewing_halfway(), ["a", "b"], summary(job_id(1)), INFO, 13.0
    )
    assert event.state is JobState.SUCCEEDED
    assert renewed == [False, False]
    assert store.results.count(job_id(1), ScoreFilter()) == 3_000
    assert _lease_expiry(store, other) > before + 30
    assert extended[0] > before + 30


def test_a_save_longer_than_the_lease_that_fails_midway_keeps_its_lease_for_the_retry(
    store: JobStore, second: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scores of a big job take longer to store than the lease lasts, while the keeper renews
    it; then the save fails (the disk filled) and is tried again. The job must still be this
    attempt's: another replica finds no expired lease to requeue, and the retry stores the scores.
    (In one transaction on PostgreSQL, the renewals skipped the row it held, the lease expired
    underneath, and the retry found it lost: hours of training done again.)"""
    monkeypatch.setattr(claims, "STAGE_ROWS", 1_000)
    _queue(store, 1)
    lease, _, _ = claim(store, "replica-a", lease_seconds=1.0)

    def rows_outlasting_the_lease_then_failing() -> Iterator[ScoreTuple]:
        for row in score_rows(3_000):
            if row[0] == 1_500:
                for _ in range(8):  # 2 s of storing, the keeper renewing as it does, a third of a lease apart
                    assert store.claims.renew_lease(lease, 1.0) is False
                    time.sleep(0.25)
                assert second.claims.requeue_expired(time.time(), max_attempts=3).queued == []
            if row[0] == 2_500:
                raise OSError("no space left on device")
            yield row

    with pytest.raises(OSError, match="no space left"):
        store.claims.save_results(
            lease, rows_outlasting_the_lease_then_failing(), ["a", "b"], summary(job_id(1)), INFO, 3.0
        )
    event = store.claims.save_results(lease, score_rows(3_000), ["a", "b"], summary(job_id(1)), INFO, 4.0)
    assert event.state is JobState.SUCCEEDED
    assert store.results.count(job_id(1), ScoreFilter()) == 3_000


def test_a_save_that_stops_midway_is_retried_cleanly_and_a_failed_job_keeps_no_scores(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save interrupted after some of its scores (the disk filled, the process died) leaves the job
    RUNNING; the next save stores exactly its own rows, even when the dataset changed size between
    attempts, and a job that ends without success afterwards holds no score rows."""
    monkeypatch.setattr(claims, "STAGE_ROWS", 1_000)
    _queue(store, 2)
    lease, _, _ = claim(store, "replica-a", lease_seconds=60.0)

    def rows_failing_at(n: int, total: int) -> Iterator[ScoreTuple]:
        for row in score_rows(total):
            if row[0] == n:
                raise OSError("no space left on device")
            yield row

    with pytest.raises(OSError, match="no space left"):
        store.claims.save_results(
            lease, rows_failing_at(2_500, 3_000), ["a", "b"], summary(job_id(1)), INFO, 3.0
        )
    assert store.get_job(job_id(1)).state is JobState.RUNNING
    store.claims.save_results(lease, score_rows(1_200), ["a", "b"], summary(job_id(1)), INFO, 4.0)
    assert [row.rank for row in store.results.iterate(job_id(1), ScoreFilter())] == list(range(1, 1_201))

    failing, _, _ = claim(store, "replica-a", lease_seconds=60.0)
    with pytest.raises(OSError, match="no space left"):
        store.claims.save_results(
            failing, rows_failing_at(2_500, 3_000), ["a", "b"], summary(job_id(2)), INFO, 5.0
        )
    store.claims.finish_job(
        failing, JobState.FAILED, 6.0, error=JobError(13, "x", "INTERNAL"), message="failed"
    )
    assert store.results.count(job_id(2), ScoreFilter()) == 0
    assert store.results.count(job_id(1), ScoreFilter()) == 1_200
