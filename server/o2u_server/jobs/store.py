"""The durable job store: jobs, their ordered event logs (`event_log`), scores and dataset summaries
(`results`) in SQLite or PostgreSQL (`database`), and the workers' claims on jobs (`claims`).

Every state change of a job is one transaction that updates the job row and appends the event that
reports it, with the next per-job sequence number, so the event log and the job never disagree and a
watcher can replay any suffix. Jobs are committed durably before CreateScoringJob answers; a
request_id names one job however many replicas receive it, also at the same moment (admission is
serialized, and the unique request_id is the last word); scores are stored with their rank as key,
so ListNoiseScores pages straight from the database and survives restarts. All methods are
blocking; the job manager calls them from worker threads, never the event loop.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

from sqlalchemy import URL, Connection, Select, bindparam, delete, func, select, update
from sqlalchemy.exc import IntegrityError

from o2u_server.domain import TERMINAL_STATES, EventType, Job, JobEvent, JobSpec, JobState
from o2u_server.errors import AlreadyExists, FailedPrecondition, NotFound, ResourceExhausted
from o2u_server.jobs import records
from o2u_server.jobs.claims import ClaimStore, Lease, LeaseLost, Recovery
from o2u_server.jobs.database import Database
from o2u_server.jobs.event_log import EventLog
from o2u_server.jobs.quotas import check_owner_quota
from o2u_server.jobs.results import ResultsStore
from o2u_server.jobs.tables import class_names, events, jobs, meta, scores, summaries, webhook_deliveries
from o2u_server.jobs.transitions import job_row, transition
from o2u_server.jobs.webhook_store import WebhookStore, job_attempts

__all__ = ["JobStore", "Lease", "LeaseLost", "QueueStats", "Recovery"]

QueueStats = tuple[int, float | None]  # queued jobs, create_time of the oldest (None when empty)


@functools.cache
def _listing(by_owner: bool, after_seq: bool, by_state: bool) -> Select[Any]:
    """ListScoringJobs' query for one set of filters, built once (the values are bound per call)."""
    query = select(jobs)
    if by_owner:
        query = query.where(jobs.c.owner == bindparam("owner"))
    if after_seq:
        query = query.where(jobs.c.seq < bindparam("after_seq"))
    if by_state:
        query = query.where(jobs.c.state == bindparam("state"))
    return query.order_by(jobs.c.seq.desc()).limit(bindparam("limit"))


class JobStore:
    """Jobs, events and results, in the database at `location` (a SQLite file path or a URL)."""

    def __init__(self, location: URL | str | Path, *, retry_seconds: float = 30.0) -> None:
        self.db = Database(location, retry_seconds=retry_seconds)
        self.events = EventLog(self.db)
        self.results = ResultsStore(self.db)
        self.claims = ClaimStore(self.db, self.events, self.results)
        self.webhooks = WebhookStore(self.db)

    def open(self) -> None:
        self.db.open()

    def close(self) -> None:
        self.db.close()

    @property
    def page_token_secret(self) -> bytes:
        def read() -> bytes:
            with self.db.read() as conn:
                query = select(meta.c.value).where(meta.c.key == "page_token_secret")
                return bytes(conn.execute(query).scalar_one())

        return self.db.retry(read)

    @staticmethod
    def _existing_request(conn: Connection, spec: JobSpec) -> Job | None:
        """The job an earlier request with spec's request_id created; AlreadyExists if it differs."""
        if not spec.request_id:
            return None
        query = select(jobs).where(jobs.c.owner == spec.owner, jobs.c.request_id == spec.request_id)
        row = conn.execute(query).mappings().first()
        if row is None:
            return None
        if row["request_hash"] != spec.fingerprint():
            raise AlreadyExists(
                f"request_id {spec.request_id!r} was already used for job {row['job_id']!r} with a "
                "different request; use a new request_id for a new job",
                reason="REQUEST_ID_REUSED",
                resource_type="scoring_job",
                resource_name=row["job_id"],
            )
        return records.job_from_row(row)

    # -- writes -----------------------------------------------------------------------------------

    def create_job(
        self, job_id: str, spec: JobSpec, now: float, *, max_queued: int, max_per_owner: int = 0
    ) -> tuple[Job, bool]:
        """Store a new QUEUED job, or return the job an earlier identical request of the same owner
        created.

        Returns (job, created). Raises AlreadyExists for a reused request_id with another payload and
        ResourceExhausted when `max_queued` jobs are already waiting, or spec's owner already has
        `max_per_owner` (when > 0) jobs queued or running (on every replica together).
        """
        try:
            return self.db.retry(lambda: self._create(job_id, spec, now, max_queued, max_per_owner))
        except IntegrityError as error:
            # Another replica inserted the same request_id between our check and our insert.
            existing = self.job_for_request(spec)
            if existing is not None:
                return existing, False
            # Or a retried insert whose first try committed and only lost its reply: the job_id,
            # this call's own, is taken by the job this call created.
            try:
                return self.get_job(job_id), True
            except NotFound:
                raise error from None

    def _create(
        self, job_id: str, spec: JobSpec, now: float, max_queued: int, max_per_owner: int
    ) -> tuple[Job, bool]:
        with self.db.write(durable=True) as conn:
            self.db.lock_admission(conn)  # from here on, this transaction sees every earlier request
            existing = self._existing_request(conn, spec)
            if existing is not None:
                return existing, False
            queued = conn.execute(
                select(func.count()).select_from(jobs).where(jobs.c.state == JobState.QUEUED.value)
            ).scalar_one()
            if queued >= max_queued:
                raise ResourceExhausted(
                    f"the job queue is full ({queued} jobs waiting, the limit is {max_queued}); "
                    "retry later or cancel queued jobs",
                    reason="QUEUE_FULL",
                    retry_after_seconds=30.0,
                )
            if max_per_owner > 0:
                check_owner_quota(conn, spec.owner, max_per_owner)
            conn.execute(jobs.insert().values(records.new_job_row(job_id, spec, now)))
            self.events.append(
                conn, job_id, now, EventType.STATE_CHANGED, JobState.QUEUED, message="job accepted"
            )
            self.db.notify(conn, f"queued {job_id}")
            return records.job_from_row(job_row(conn, job_id)), True

    def request_cancel(self, job_id: str, now: float) -> tuple[Job, JobEvent | None]:
        """Cancel a queued job at once, or flag a running one for its worker (wherever it runs: the
        replicas are notified); finished jobs are kept as they are."""

        def cancel() -> tuple[Job, JobEvent | None]:
            with self.db.write(durable=True) as conn:
                state = JobState(job_row(conn, job_id, lock=True)["state"])
                event = None
                if state is JobState.QUEUED:
                    event = transition(
                        conn, self.events, job_id, JobState.CANCELLED, now, message="cancelled while queued"
                    )
                elif state is JobState.RUNNING:
                    conn.execute(update(jobs).where(jobs.c.job_id == job_id).values(cancel_requested=True))
                    self.db.notify(conn, f"cancel {job_id}")
                return records.job_from_row(job_row(conn, job_id)), event

        return self.db.retry(cancel)

    def delete_job(self, job_id: str) -> None:
        """Delete a finished job and everything stored for it. A retry that finds the job gone
        after a try whose reply was lost (the connection broke at COMMIT) has deleted it: done,
        not NOT_FOUND."""
        tries = 0

        def remove() -> None:
            nonlocal tries
            tries += 1
            with self.db.write(durable=True) as conn:
                try:
                    row = job_row(conn, job_id, lock=True)
                except NotFound:
                    if tries > 1:
                        return
                    raise
                state = JobState(row["state"])
                if state not in TERMINAL_STATES:
                    raise FailedPrecondition(
                        f"scoring job {job_id!r} is {state.value.upper()}; cancel it and wait for it to "
                        "finish before deleting it",
                        reason="JOB_NOT_FINISHED",
                        resource_type="scoring_job",
                        resource_name=job_id,
                    )
                for table in (events, scores, class_names, summaries, webhook_deliveries, jobs):
                    conn.execute(delete(table).where(table.c.job_id == job_id))

        self.db.retry(remove)

    # -- reads ------------------------------------------------------------------------------------

    def get_job(self, job_id: str) -> Job:
        def read() -> Job:
            with self.db.read() as conn:
                job = records.job_from_row(job_row(conn, job_id))
                return dataclasses.replace(job, webhook_deliveries=job_attempts(conn, job_id))

        return self.db.retry(read)

    def is_open(self, job_id: str) -> bool:
        """Whether the job exists and has not ended (queued or running)."""

        def read() -> bool:
            with self.db.read() as conn:
                state = conn.execute(select(jobs.c.state).where(jobs.c.job_id == job_id)).scalar_one_or_none()
                return state is not None and JobState(state) not in TERMINAL_STATES

        return self.db.retry(read)

    def job_for_request(self, spec: JobSpec) -> Job | None:
        """The job created earlier for spec's request_id, if any (see create_job)."""

        def read() -> Job | None:
            with self.db.read() as conn:
                return self._existing_request(conn, spec)

        return self.db.retry(read)

    def list_jobs(
        self, state: JobState | None, after_seq: int | None, limit: int, owner: str | None = None
    ) -> list[tuple[int, Job]]:
        """Jobs newest first, as (row number, job), strictly older than `after_seq` when given, only
        `owner`'s when given."""
        query = _listing(owner is not None, after_seq is not None, state is not None)
        parameters = {"owner": owner, "after_seq": after_seq, "state": state.value if state else None}

        def read() -> list[tuple[int, Job]]:
            with self.db.read() as conn:
                rows = conn.execute(query, {**parameters, "limit": limit}).mappings()
                return [(row["seq"], records.job_from_row(row)) for row in rows]

        return self.db.retry(read)

    def job_with_events(self, job_id: str, after_sequence: int) -> tuple[Job, list[JobEvent]]:
        """The job and its events after `after_sequence`, from one consistent snapshot."""

        def read() -> tuple[Job, list[JobEvent]]:
            with self.db.read() as conn:
                job = records.job_from_row(job_row(conn, job_id))
                return job, self.events.read(conn, job_id, after_sequence)

        return self.db.retry(read)

    def state_counts(self) -> dict[JobState, int]:
        def read() -> dict[JobState, int]:
            with self.db.read() as conn:
                rows = conn.execute(select(jobs.c.state, func.count()).group_by(jobs.c.state))
                return {JobState(state): int(count) for state, count in rows}

        return {**dict.fromkeys(JobState, 0), **self.db.retry(read)}

    def queue_stats(self) -> QueueStats:
        """How many jobs wait for a worker, and when the oldest of them was accepted."""

        def read() -> QueueStats:
            with self.db.read() as conn:
                query = select(func.count(), func.min(jobs.c.create_time)).where(
                    jobs.c.state == JobState.QUEUED.value
                )
                count, oldest = conn.execute(query).one()
                return int(count), oldest

        return self.db.retry(read)
