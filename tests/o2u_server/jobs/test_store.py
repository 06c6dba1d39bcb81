"""The SQLite job store on its own: transitions, event sequences, results, recovery and locking."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from o2u_server.domain import (
    ClassNoise,
    DatasetSummary,
    EventType,
    JobSpec,
    JobState,
    Progress,
    RunInfo,
    ScoreFilter,
    ScoreTuple,
    Stage,
)
from o2u_server.errors import AlreadyExists, FailedPrecondition, NotFound, ResourceExhausted
from o2u_server.jobs.database import StateDirLockedError
from o2u_server.jobs.store import JobStore

SPEC = JobSpec(dataset_uri="file:///data/x.npz", dataset_format=None, config={"seed": 1}, request_id="r-1")
INFO = RunInfo(1, "0.1.0", "2", "cpu", 4, 2, "{}", "0.1.0", "mlp")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[JobStore]:
    opened = JobStore(tmp_path / "jobs.sqlite3")
    opened.open()
    yield opened
    assert opened.db.connection().execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    opened.close()


def _id(n: int) -> str:
    return f"job-{n:032x}"


def _rows(n: int) -> list[ScoreTuple]:
    # rank r has score n - r, the first third is suspected
    return [
        (r, n - r, f"k{n - r}", r % 2, float(n - r), 0.1, 0.5, r <= n // 3, (r + 1) % 2, 0.9)
        for r in range(1, n + 1)
    ]


def _summary(job_id: str) -> DatasetSummary:
    classes = [ClassNoise(0, "a", 3, 1, 1 / 3), ClassNoise(1, "b", 3, 1, 1 / 3)]
    return DatasetSummary(
        job_id, 6, 2, ["a", "b"], 0.3, 0.3, 2, classes, [0.5, 0.5, 0.5, 0.5], [], run_info=INFO
    )


def test_lifecycle_appends_one_event_per_change(store: JobStore) -> None:
    job, created = store.create_job(_id(1), SPEC, 100.0, max_queued=10)
    assert created
    assert job.state is JobState.QUEUED
    assert job.last_sequence == 1
    started = store.start_job(_id(1), 101.0)
    assert started is not None
    assert started[0].attempts == 1
    assert started[1].sequence == 2
    assert started[0].progress == Progress(Stage.LOADING)
    progress = Progress(Stage.PRETRAINING, epoch=1, epochs_total=2, fraction_done=0.25, mean_loss=1.5)
    assert store.record_progress(_id(1), progress, 102.0).sequence == 3
    done = store.save_results(_id(1), _rows(6), ["a", "b"], _summary(_id(1)), INFO, 103.0)
    assert (done.sequence, done.state, done.terminal) == (4, JobState.SUCCEEDED, True)
    assert store.finish_job(_id(1), JobState.FAILED, 104.0) is None  # final states are final

    job = store.get_job(_id(1))
    assert (job.state, job.start_time, job.end_time, job.run_info) == (JobState.SUCCEEDED, 101.0, 103.0, INFO)
    assert job.progress == progress
    events = store.events.after(_id(1), 0)
    assert [e.sequence for e in events] == [1, 2, 3, 4]
    assert [e.type for e in events] == [EventType.STATE_CHANGED] * 2 + [
        EventType.PROGRESS,
        EventType.STATE_CHANGED,
    ]
    assert store.events.after(_id(1), 2, until=3) == events[2:3]
    assert store.results.summary(_id(1)) == _summary(_id(1))


def test_idempotency_and_queue_limit(store: JobStore) -> None:
    store.create_job(_id(1), SPEC, 1.0, max_queued=2)
    again, created = store.create_job(_id(2), SPEC, 2.0, max_queued=2)
    assert (again.job_id, created) == (_id(1), False)
    with pytest.raises(AlreadyExists):
        store.create_job(_id(2), JobSpec("file:///data/y.npz", None, {}, request_id="r-1"), 2.0, max_queued=2)
    store.create_job(_id(2), JobSpec("file:///data/y.npz", None, {}), 3.0, max_queued=2)
    with pytest.raises(ResourceExhausted) as full:
        store.create_job(_id(3), JobSpec("file:///data/z.npz", None, {}), 4.0, max_queued=2)
    assert full.value.retry_after_seconds
    assert [job.job_id for _, job in store.list_jobs(None, None, 10)] == [_id(2), _id(1)]


def test_sequences_stay_strictly_increasing_under_concurrent_writers(store: JobStore) -> None:
    store.create_job(_id(1), SPEC, 1.0, max_queued=10)
    store.start_job(_id(1), 2.0)

    def write() -> None:
        for _ in range(50):
            store.record_progress(_id(1), Progress(Stage.CYCLIC), 3.0)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [e.sequence for e in store.events.after(_id(1), 0)] == list(range(1, 203))


def test_score_pages_filters_and_counts(store: JobStore) -> None:
    store.create_job(_id(1), SPEC, 1.0, max_queued=10)
    store.start_job(_id(1), 2.0)
    store.save_results(_id(1), _rows(30), ["a", "b"], _summary(_id(1)), INFO, 3.0)
    page = store.results.page(_id(1), ScoreFilter(), after_rank=10, limit=5)
    assert [row.rank for row in page] == [11, 12, 13, 14, 15]
    assert page[0].given_label_name == ["a", "b"][page[0].given_label]
    assert store.results.count(_id(1), ScoreFilter(top_k=7)) == 7
    assert store.results.count(_id(1), ScoreFilter(only_suspected=True)) == 10
    assert store.results.count(_id(1), ScoreFilter(min_score=25.0)) == 5
    assert store.results.count(_id(1), ScoreFilter(top_k=20, only_suspected=True, min_score=22.0)) == 8
    assert [row.rank for row in store.results.iterate(_id(1), ScoreFilter(only_suspected=True))] == list(
        range(1, 11)
    )


def test_cancel_and_delete(store: JobStore, tmp_path: Path) -> None:
    store.create_job(_id(1), SPEC, 1.0, max_queued=10)
    job, event = store.request_cancel(_id(1), 2.0)
    assert job.state is JobState.CANCELLED
    assert event is not None
    assert event.terminal

    store.create_job(_id(2), JobSpec("file:///d/y.npz", None, {}), 3.0, max_queued=10)
    store.start_job(_id(2), 4.0)
    job, event = store.request_cancel(_id(2), 5.0)
    assert job.state is JobState.RUNNING
    assert event is None
    with pytest.raises(FailedPrecondition):
        store.delete_job(_id(2))

    store.delete_job(_id(1))
    with pytest.raises(NotFound):
        store.get_job(_id(1))
    assert store.events.after(_id(1), 0) == []


def test_recovery_requeues_counts_crashes_and_honours_cancels(store: JobStore, tmp_path: Path) -> None:
    for n in (1, 2, 3):
        store.create_job(_id(n), JobSpec(f"file:///d/{n}.npz", None, {}), float(n), max_queued=10)
    store.start_job(_id(1), 5.0)  # running when the process died
    store.start_job(_id(3), 5.0)
    store.request_cancel(_id(3), 6.0)  # cancel requested, never acted on

    recovery = store.recover(7.0, max_attempts=2)
    assert recovery.queued == [_id(1), _id(2)]
    assert recovery.finished == [JobState.CANCELLED]
    assert store.get_job(_id(3)).state is JobState.CANCELLED

    store.start_job(_id(1), 8.0)  # crashes again, no further than before
    recovery = store.recover(9.0, max_attempts=2)
    assert recovery.queued == [_id(2)]
    assert recovery.finished == [JobState.FAILED]
    failed = store.get_job(_id(1))
    assert failed.error is not None
    assert (failed.error.code, failed.error.reason) == (13, "TOO_MANY_ATTEMPTS")
    assert "2 times in a row" in failed.error.message
    assert "file:///d/1.npz" in failed.error.message  # names the dataset...
    assert "while it loaded the dataset" in failed.error.message  # ...and where the server died
    assert failed.attempts == 2


def test_crashes_count_only_when_the_job_got_no_further(store: JobStore) -> None:
    store.create_job(_id(1), JobSpec("file:///d/1.npz", None, {}), 1.0, max_queued=10)
    now = 2.0
    for epoch in range(1, 6):  # five crashes, each after one more epoch than the attempt before
        store.start_job(_id(1), now)
        store.record_progress(_id(1), Progress(Stage.PRETRAINING, epoch=epoch, epochs_total=9), now)
        assert store.recover(now + 0.5, max_attempts=2).queued == [_id(1)]
        now += 1.0
    row = store.db.connection().execute("SELECT crashes FROM jobs WHERE job_id = ?", (_id(1),)).fetchone()
    assert row[0] == 0
    store.start_job(_id(1), now)  # resumed from epoch 4's checkpoint, dies at the same epoch 5
    store.record_progress(_id(1), Progress(Stage.PRETRAINING, epoch=5, epochs_total=9), now)
    assert store.recover(now + 0.5, max_attempts=2).queued == [_id(1)]
    store.start_job(_id(1), now + 1)
    store.record_progress(_id(1), Progress(Stage.PRETRAINING, epoch=5, epochs_total=9), now + 1)
    recovery = store.recover(now + 1.5, max_attempts=2)
    assert recovery.finished == [JobState.FAILED]
    failed = store.get_job(_id(1))
    assert failed.error is not None
    assert "in stage 1 (pre-training) after epoch 5 of 9" in failed.error.message


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
