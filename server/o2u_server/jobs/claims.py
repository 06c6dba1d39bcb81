"""The workers' side of the job store: claims under a lease, and writes fenced by them.

A worker claims the oldest QUEUED job (`FOR UPDATE SKIP LOCKED` on PostgreSQL, so replicas never
claim the same one and never wait for each other) and holds it under a lease: its replica's name
and an expiry on the database's clock, renewed while it trains. Every write it makes for the job (a
progress event, run information, results, the final state) is fenced by its `Lease`: the update
only happens while the job is still RUNNING under the same attempt number, owner and an unexpired
lease; otherwise `LeaseLost` is raised and the transaction rolls back. A replica that was paused or
cut off past its lease can so never overwrite what the new owner writes.

A lease that expires (its replica crashed, or stopped renewing) makes the job an orphan:
`requeue_expired`, run by every replica now and then, puts it back in the queue as a crash of that
attempt (`jobs.crashes`: counted only when the attempt got no further than an earlier one; FAILED
after `max_attempts` counted in a row, CANCELLED if a cancel was pending), and the next claim
resumes it from its last checkpoint under the next attempt number.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field

from sqlalchemy import ColumnElement, Connection, and_, or_, select, update

from o2u_server.domain import (
    DatasetSummary,
    EventType,
    Job,
    JobError,
    JobEvent,
    JobState,
    Progress,
    RunInfo,
    ScoreTuple,
    Stage,
)
from o2u_server.jobs import records
from o2u_server.jobs.crashes import requeue_crashed
from o2u_server.jobs.database import Database
from o2u_server.jobs.event_log import EventLog
from o2u_server.jobs.results import STAGE_ROWS, ResultsStore
from o2u_server.jobs.tables import jobs
from o2u_server.jobs.transitions import job_row, transition

__all__ = ["ClaimStore", "Lease", "LeaseLost", "Recovery"]


@dataclass(frozen=True)
class Lease:
    """One replica's claim on one attempt of a job; every write the attempt makes is fenced by it."""

    job_id: str
    attempt: int
    owner: str


def _is_claim_at(event: JobEvent, now: float) -> bool:
    """Whether `event` is a claim's: the job became RUNNING at `now`."""
    return (
        event.type is EventType.STATE_CHANGED and event.state is JobState.RUNNING and event.event_time == now
    )


def _is_progress(event: JobEvent, progress: Progress) -> bool:
    return event.type is EventType.PROGRESS and event.progress == progress


class LeaseLost(RuntimeError):
    """A fenced write was refused: the job is no longer this lease's (it expired, was taken over,
    or the job finished meanwhile). The attempt must stop without writing anything more."""

    def __init__(self, lease: Lease) -> None:
        super().__init__(f"attempt {lease.attempt} of job {lease.job_id} no longer holds its lease")
        self.lease = lease


@dataclass
class Recovery:
    """What `recover` or `requeue_expired` did to jobs whose worker is gone."""

    queued: list[str] = field(default_factory=list)  # put back in the queue, oldest first
    finished: list[JobState] = field(default_factory=list)  # final states it set
    events: list[JobEvent] = field(default_factory=list)  # every state change it made


class ClaimStore:
    """Claims, lease renewals and fenced writes; each method is one retried transaction."""

    def __init__(self, db: Database, log: EventLog, results: ResultsStore) -> None:
        self._db = db
        self._log = log
        self._results = results

    def _held(self, lease: Lease) -> ColumnElement[bool]:
        return and_(
            jobs.c.attempts == lease.attempt,
            jobs.c.lease_owner == lease.owner,
            jobs.c.state == JobState.RUNNING.value,
            jobs.c.lease_expires_at > self._db.clock(),
        )

    def _fenced(self, conn: Connection, lease: Lease, **values: object) -> None:
        statement = update(jobs).where(jobs.c.job_id == lease.job_id, self._held(lease)).values(**values)
        if conn.execute(statement).rowcount != 1:
            raise LeaseLost(lease)

    # -- claiming ---------------------------------------------------------------------------------

    def claim_job(
        self, owner: str, now: float, *, lease_seconds: float
    ) -> tuple[Lease, Job, JobEvent] | None:
        """QUEUED -> RUNNING for the oldest queued job, counting the attempt; None if none waits.
        A retry after a try whose COMMIT reply was lost returns the job that try claimed, instead of
        claiming a second one and leaving the first RUNNING under a lease nobody renews."""
        tries = 0

        def claim() -> tuple[Lease, Job, JobEvent] | None:
            nonlocal tries
            tries += 1
            with self._db.write(durable=True) as conn:
                if tries > 1 and (earlier := self._claimed(conn, owner, now)) is not None:
                    return earlier
                oldest = (
                    select(jobs.c.job_id)
                    .where(jobs.c.state == JobState.QUEUED.value)
                    .order_by(jobs.c.seq)
                    .limit(1)
                    .with_for_update(skip_locked=True)
                )
                job_id = conn.execute(oldest).scalar_one_or_none()
                if job_id is None:
                    return None
                row = job_row(conn, job_id)
                attempt = row["attempts"] + 1
                event = transition(
                    conn,
                    self._log,
                    job_id,
                    JobState.RUNNING,
                    now,
                    message=f"attempt {attempt} started on {owner}",
                    attempts=attempt,
                    start_time=row["start_time"] if row["start_time"] is not None else now,
                    progress_json=records.encode(Progress(stage=Stage.LOADING)),
                    lease_owner=owner,
                    lease_expires_at=self._db.clock() + lease_seconds,
                )
                assert event is not None  # the row is locked and QUEUED
                return Lease(job_id, attempt, owner), records.job_from_row(job_row(conn, job_id)), event

        return self._db.retry(claim)

    def _claimed(self, conn: Connection, owner: str, now: float) -> tuple[Lease, Job, JobEvent] | None:
        """The job a claim by `owner` at `now` made: RUNNING under `owner`, its last event the claim's
        (no one else writes to it: its claimer never heard of it)."""
        running = select(jobs.c.job_id, jobs.c.attempts, jobs.c.last_sequence).where(
            jobs.c.state == JobState.RUNNING.value, jobs.c.lease_owner == owner
        )
        for row in conn.execute(running).all():
            last = self._log.read(conn, row.job_id, row.last_sequence - 1, row.last_sequence)
            if last and _is_claim_at(last[0], now):
                job = records.job_from_row(job_row(conn, row.job_id))
                return Lease(row.job_id, row.attempts, owner), job, last[0]
        return None

    def renew_lease(self, lease: Lease, lease_seconds: float) -> bool | None:
        """Extend the lease by `lease_seconds`; returns whether a cancel is pending, None if lost.

        On PostgreSQL a job row another transaction holds locked - the attempt's own write, such as
        a step of its scores - is not waited for: that lease is left as it is this round (it is not
        lost while the row is held: requeues skip locked rows), so the keeper goes on to renew every
        other job's in time."""

        def renew() -> bool | None:
            with self._db.write() as conn:
                if self._db.postgresql:
                    mine = and_(jobs.c.job_id == lease.job_id, self._held(lease))
                    free = select(jobs.c.job_id).where(mine).with_for_update(skip_locked=True)
                    if conn.execute(free).first() is None:  # lost, or locked: the last commit tells
                        held = conn.execute(select(jobs.c.cancel_requested).where(mine)).first()
                        return None if held is None else bool(held[0])
                statement = (
                    update(jobs)
                    .where(jobs.c.job_id == lease.job_id, self._held(lease))
                    .values(lease_expires_at=self._db.clock() + lease_seconds)
                    .returning(jobs.c.cancel_requested)
                )
                found = conn.execute(statement).first()
                return None if found is None else bool(found[0])

        return self._db.retry(renew)

    # -- fenced writes ----------------------------------------------------------------------------

    def record_progress(self, lease: Lease, progress: Progress, now: float) -> JobEvent:
        """Append a progress event. A retry after a try whose COMMIT reply was lost finds that try's
        event last in the log and returns it, instead of appending the same progress twice."""
        tries = 0

        def record() -> JobEvent:
            nonlocal tries
            tries += 1
            if (
                tries > 1
                and (event := self._last_event(lease, lambda e: _is_progress(e, progress))) is not None
            ):
                return event
            with self._db.write() as conn:
                event = self._log.append(
                    conn,
                    lease.job_id,
                    now,
                    EventType.PROGRESS,
                    JobState.RUNNING,
                    progress=progress,
                    where=self._held(lease),
                    changes={"progress_json": records.encode(progress), "update_time": now},
                )
                if event is None:
                    raise LeaseLost(lease)
                return event

        return self._db.retry(record)

    def set_run_info(self, lease: Lease, run_info: RunInfo, now: float) -> None:
        def store() -> None:
            with self._db.write() as conn:
                self._fenced(conn, lease, run_info_json=records.encode(run_info), update_time=now)

        self._db.retry(store)

    def finish_job(
        self, lease: Lease, state: JobState, now: float, *, error: JobError | None = None, message: str = ""
    ) -> JobEvent:
        """End the attempt in a final state (FAILED or CANCELLED)."""

        def finish() -> JobEvent:
            with self._db.write(durable=True) as conn:
                event = transition(
                    conn,
                    self._log,
                    lease.job_id,
                    state,
                    now,
                    error=error,
                    message=message,
                    where=self._held(lease),
                )
                if event is None:
                    raise LeaseLost(lease)
                return event

        return self._ending(lease, (state,), finish)

    def release_job(self, lease: Lease, now: float, *, message: str) -> JobEvent:
        """Give a stopped attempt's job back to the queue (or CANCELLED, if a cancel was pending)."""

        def release() -> JobEvent:
            with self._db.write(durable=True) as conn:
                self._fenced(conn, lease, update_time=now)  # locks the row for this transaction
                if job_row(conn, lease.job_id)["cancel_requested"]:
                    state, message_ = JobState.CANCELLED, "cancelled"
                else:
                    state, message_ = JobState.QUEUED, message
                event = transition(
                    conn,
                    self._log,
                    lease.job_id,
                    state,
                    now,
                    message=message_,
                    lease_owner=None,
                    lease_expires_at=None,
                )
                assert event is not None
                self._db.notify(conn, f"queued {lease.job_id}")  # another replica may resume it now
                return event

        return self._ending(lease, (JobState.QUEUED, JobState.CANCELLED), release)

    def retry_job(self, lease: Lease, now: float, *, cause: str, max_attempts: int) -> JobEvent:
        """Requeue a job whose attempt ended because a training worker failed (`cause`), counted as a
        crash of the attempt (`jobs.crashes`): QUEUED to resume from its last checkpoint, FAILED
        after `max_attempts` such failures in a row without progress, CANCELLED if a cancel is
        pending."""

        def retry() -> JobEvent:
            with self._db.write(durable=True) as conn:
                self._fenced(conn, lease, update_time=now)  # locks the row for this transaction
                row = job_row(conn, lease.job_id)
                if row["cancel_requested"]:
                    event = transition(
                        conn, self._log, lease.job_id, JobState.CANCELLED, now, message="cancelled"
                    )
                else:
                    event = requeue_crashed(
                        conn,
                        self._log,
                        lease.job_id,
                        crashes=row["crashes"],
                        dataset_uri=row["dataset_uri"],
                        progress=records.decode_progress(row["progress_json"]),
                        cause=cause,
                        now=now,
                        max_attempts=max_attempts,
                        worker_failure=True,
                    )
                assert event is not None
                if event.state is JobState.QUEUED:
                    self._db.notify(conn, f"queued {lease.job_id}")
                return event

        return self._ending(lease, (JobState.QUEUED, JobState.CANCELLED, JobState.FAILED), retry)

    def save_results(
        self,
        lease: Lease,
        scores: Iterable[ScoreTuple],
        class_names: list[str],
        summary: DatasetSummary,
        run_info: RunInfo,
        now: float,
    ) -> JobEvent:
        """Store scores and summary and mark the job SUCCEEDED (`scores` is iterated once per try:
        a retried save loads them again). The scores go first, in fenced transactions of
        `STAGE_ROWS` (see `_stage_scores`), and the last transaction stores the summary and the final
        state."""

        def save() -> JobEvent:
            self._stage_scores(lease, scores, now)
            with self._db.write(durable=True) as conn:
                self._fenced(conn, lease, run_info_json=records.encode(run_info))
                self._results.insert_summary(conn, lease.job_id, class_names, summary)
                event = transition(
                    conn, self._log, lease.job_id, JobState.SUCCEEDED, now, message="scores are ready"
                )
                assert event is not None
                return event

        return self._ending(lease, (JobState.SUCCEEDED,), save)

    def _stage_scores(self, lease: Lease, scores: Iterable[ScoreTuple], now: float) -> None:
        """Write the scores in transactions of `STAGE_ROWS` rows, each fenced by the lease, building
        each batch while no write is held. Between them the lease keeper renews this job's lease
        and every other job's: on SQLite, one writer, they get the write lock; on PostgreSQL the
        job's row is free again, so a save longer than the lease keeps it (one transaction of
        millions of rows held the row, renewals skipped it, and a save that then failed and was
        retried found its lease expired; and a replica frozen during it held the row, and every
        cancel or delete of the job, while frozen: now only one frozen inside a step's COPY does).
        The rows a previous try or attempt left (a crash or a full disk in the middle) are deleted
        first, in the same steps. Until the job is SUCCEEDED no read sees them."""

        @contextlib.contextmanager
        def step() -> Iterator[Connection]:
            with self._db.write() as conn:
                self._fenced(conn, lease, update_time=now)
                yield conn

        with step() as conn:
            stale = self._results.highest_rank(conn, lease.job_id)
        for low in range(0, stale, STAGE_ROWS):
            with step() as conn:
                self._results.clear(conn, lease.job_id, ranks=(low, low + STAGE_ROWS))
        rows = iter(scores)
        while batch := list(itertools.islice(rows, STAGE_ROWS)):
            with step() as conn:
                self._results.insert_scores(conn, lease.job_id, batch)

    def _ending(self, lease: Lease, states: Collection[JobState], write: Callable[[], JobEvent]) -> JobEvent:
        """Run `write`, the transaction that ends `lease`'s attempt in one of `states` (a final state,
        or back in the queue), again while the database is unreachable. When a retry finds the lease
        gone, the try before it may have committed and only lost its reply (the connection broke at
        COMMIT): then the store holds one of `states` from this very attempt, and its event is the
        result, not LeaseLost (which would have the attempt log a lost lease and skip what follows
        the write)."""
        tries = 0

        def once() -> JobEvent:
            nonlocal tries
            tries += 1
            try:
                return write()
            except LeaseLost:
                if tries > 1 and (event := self._committed(lease, states)) is not None:
                    return event
                raise

        return self._db.retry(once)

    def _committed(self, lease: Lease, states: Collection[JobState]) -> JobEvent | None:
        """The job's last event, if that is `lease`'s attempt entering one of `states`."""
        return self._last_event(lease, lambda e: e.type is EventType.STATE_CHANGED and e.state in states)

    def _last_event(self, lease: Lease, accept: Callable[[JobEvent], bool]) -> JobEvent | None:
        """The job's last event, if `lease`'s attempt is the job's latest and `accept` takes the event
        (None otherwise): what a retry after a lost COMMIT reply finds of the try before it."""
        with self._db.read() as conn:
            row = conn.execute(
                select(jobs.c.attempts, jobs.c.last_sequence).where(jobs.c.job_id == lease.job_id)
            ).first()
            if row is None or row.attempts != lease.attempt:
                return None
            last = self._log.read(conn, lease.job_id, row.last_sequence - 1, row.last_sequence)
        return last[0] if last and accept(last[0]) else None

    # -- orphans ----------------------------------------------------------------------------------

    def recover(self, now: float, *, max_attempts: int) -> Recovery:
        """At start-up with SQLite (the state directory is locked: no other process runs jobs): every
        RUNNING job was interrupted by a crash; requeue it (see `requeue_expired`)."""
        return self._db.retry(lambda: self._requeue(now, max_attempts, expired_only=False))

    def requeue_expired(self, now: float, *, max_attempts: int) -> Recovery:
        """Requeue the RUNNING jobs whose lease expired: their replica crashed or lost contact."""
        return self._db.retry(lambda: self._requeue(now, max_attempts, expired_only=True))

    def _requeue(self, now: float, max_attempts: int, *, expired_only: bool) -> Recovery:
        """Requeue each orphan as a crash of its attempt (`jobs.crashes`: it counts against the job
        only when the attempt got no further than an earlier one; FAILED after `max_attempts` such
        crashes in a row). Jobs whose cancellation was requested are CANCELLED instead."""
        recovery = Recovery()
        orphans = or_(jobs.c.state == JobState.RUNNING.value, jobs.c.cancel_requested.is_(True))
        if expired_only:
            lapsed = or_(jobs.c.lease_expires_at.is_(None), jobs.c.lease_expires_at < self._db.clock())
            orphans = and_(jobs.c.state == JobState.RUNNING.value, lapsed)
        query = (
            select(jobs)
            .where(jobs.c.state.in_((JobState.QUEUED.value, JobState.RUNNING.value)), orphans)
            .order_by(jobs.c.seq)
            .with_for_update(skip_locked=True)  # another replica requeueing the same job skips it
        )
        with self._db.write(durable=True) as conn:
            for row in conn.execute(query).mappings().all():
                job_id, owner = row["job_id"], row["lease_owner"]
                if row["cancel_requested"]:
                    event = transition(
                        conn, self._log, job_id, JobState.CANCELLED, now, message="cancelled before a restart"
                    )
                else:
                    event = requeue_crashed(
                        conn,
                        self._log,
                        job_id,
                        crashes=row["crashes"],
                        dataset_uri=row["dataset_uri"],
                        progress=records.decode_progress(row["progress_json"]),
                        cause=f"{owner or 'its replica'} stopped renewing its lease"
                        if expired_only
                        else "the server stopped during the job",
                        now=now,
                        max_attempts=max_attempts,
                    )
                assert event is not None
                if event.state is JobState.QUEUED:
                    self._db.notify(conn, f"queued {job_id}")
                    recovery.queued.append(job_id)
                else:
                    recovery.finished.append(event.state)
                recovery.events.append(event)
        return recovery
