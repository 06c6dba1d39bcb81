"""The durable job store: jobs, their ordered event logs (`event_log`), scores and dataset summaries
(`results`) in SQLite (`database`).

Every state change of a job is one transaction that updates the job row and appends the event that
reports it, with the next per-job sequence number, so the event log and the job never disagree and a
watcher can replay any suffix. Jobs are committed durably before CreateScoringJob answers; scores are
stored with their rank as key, so ListNoiseScores pages straight from disk and survives restarts.
All methods are blocking; the job manager calls them from worker threads, never the event loop.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from o2u_server.domain import (
    TERMINAL_STATES,
    DatasetSummary,
    EventType,
    Job,
    JobError,
    JobEvent,
    JobSpec,
    JobState,
    Progress,
    RunInfo,
    ScoreTuple,
    Stage,
)
from o2u_server.errors import AlreadyExists, FailedPrecondition, NotFound, ResourceExhausted
from o2u_server.jobs import records
from o2u_server.jobs.crashes import attempt_progressed, too_many_crashes
from o2u_server.jobs.database import Database
from o2u_server.jobs.event_log import EventLog
from o2u_server.jobs.results import ResultsStore

__all__ = ["JobStore", "Recovery"]


@dataclass
class Recovery:
    """What `recover` did to the jobs left unfinished by the previous process."""

    queued: list[str] = field(default_factory=list)  # to run, oldest first
    finished: list[JobState] = field(default_factory=list)  # final states it set


def _not_found(job_id: str) -> NotFound:
    return NotFound(
        f"scoring job {job_id!r} does not exist (it may have been deleted)",
        reason="JOB_NOT_FOUND",
        resource_type="scoring_job",
        resource_name=job_id,
    )


class JobStore:
    """Jobs, events and results of one server, in `<state_dir>/jobs.sqlite3`."""

    def __init__(self, path: Path) -> None:
        self.db = Database(path)
        self.events = EventLog(self.db)
        self.results = ResultsStore(self.db)

    def open(self) -> None:
        self.db.open()

    def close(self) -> None:
        self.db.close()

    @property
    def page_token_secret(self) -> bytes:
        return self.db.meta("page_token_secret")

    # -- internal helpers (called inside a transaction) ----------------------------------------

    @staticmethod
    def _row(conn: sqlite3.Connection, job_id: str) -> sqlite3.Row:
        row: sqlite3.Row | None = conn.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise _not_found(job_id)
        return row

    def _transition(
        self,
        conn: sqlite3.Connection,
        job_id: str,
        state: JobState,
        now: float,
        *,
        error: JobError | None = None,
        message: str = "",
    ) -> JobEvent:
        end_time = now if state in TERMINAL_STATES else None
        conn.execute(
            "UPDATE jobs SET state = ?, update_time = ?, end_time = ?, error_json = COALESCE(?, error_json) "
            "WHERE job_id = ?",
            (state.value, now, end_time, records.encode(error), job_id),
        )
        return self.events.append(
            conn, job_id, now, EventType.STATE_CHANGED, state, error=error, message=message
        )

    @staticmethod
    def _existing_request(conn: sqlite3.Connection, spec: JobSpec) -> Job | None:
        """The job an earlier request with spec's request_id created; AlreadyExists if it differs."""
        if not spec.request_id:
            return None
        row = conn.execute("SELECT * FROM jobs WHERE request_id = ?", (spec.request_id,)).fetchone()
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

    def create_job(self, job_id: str, spec: JobSpec, now: float, *, max_queued: int) -> tuple[Job, bool]:
        """Store a new QUEUED job, or return the job an earlier identical request created.

        Returns (job, created). Raises AlreadyExists for a reused request_id with another payload and
        ResourceExhausted when `max_queued` jobs are already waiting.
        """
        with self.db.write(durable=True) as conn:
            existing = self._existing_request(conn, spec)
            if existing is not None:
                return existing, False
            (queued,) = conn.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued'").fetchone()
            if queued >= max_queued:
                raise ResourceExhausted(
                    f"the job queue is full ({queued} jobs waiting, the limit is {max_queued}); "
                    "retry later or cancel queued jobs",
                    reason="QUEUE_FULL",
                    retry_after_seconds=30.0,
                )
            row = records.new_job_row(job_id, spec, now)
            conn.execute(
                f"INSERT INTO jobs ({', '.join(row)}) VALUES ({', '.join(':' + name for name in row)})", row
            )
            self.events.append(
                conn, job_id, now, EventType.STATE_CHANGED, JobState.QUEUED, message="job accepted"
            )
            return records.job_from_row(self._row(conn, job_id)), True

    def start_job(self, job_id: str, now: float) -> tuple[Job, JobEvent] | None:
        """QUEUED -> RUNNING for a worker, counting the attempt; None if the job is no longer queued."""
        with self.db.write(durable=True) as conn:
            row = conn.execute("SELECT state, attempts FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if row is None or row["state"] != JobState.QUEUED.value:
                return None
            attempt = row["attempts"] + 1
            conn.execute(
                "UPDATE jobs SET attempts = ?, start_time = COALESCE(start_time, ?), progress_json = ? "
                "WHERE job_id = ?",
                (attempt, now, records.encode(Progress(stage=Stage.LOADING)), job_id),
            )
            event = self._transition(
                conn, job_id, JobState.RUNNING, now, message=f"attempt {attempt} started"
            )
            return records.job_from_row(self._row(conn, job_id)), event

    def record_progress(self, job_id: str, progress: Progress, now: float) -> JobEvent:
        with self.db.write() as conn:
            conn.execute(
                "UPDATE jobs SET progress_json = ?, update_time = ? WHERE job_id = ?",
                (records.encode(progress), now, job_id),
            )
            return self.events.append(
                conn, job_id, now, EventType.PROGRESS, JobState.RUNNING, progress=progress
            )

    def set_run_info(self, job_id: str, run_info: RunInfo, now: float) -> None:
        with self.db.write() as conn:
            conn.execute(
                "UPDATE jobs SET run_info_json = ?, update_time = ? WHERE job_id = ?",
                (records.encode(run_info), now, job_id),
            )

    def finish_job(
        self, job_id: str, state: JobState, now: float, *, error: JobError | None = None, message: str = ""
    ) -> JobEvent | None:
        """Move an unfinished job to a final state (or back to QUEUED); None if it already finished."""
        with self.db.write(durable=True) as conn:
            row = conn.execute("SELECT state FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if row is None or JobState(row["state"]) in TERMINAL_STATES:
                return None
            return self._transition(conn, job_id, state, now, error=error, message=message)

    def save_results(
        self,
        job_id: str,
        scores: Iterable[ScoreTuple],
        class_names: list[str],
        summary: DatasetSummary,
        run_info: RunInfo,
        now: float,
    ) -> JobEvent:
        """Store scores and summary and mark the job SUCCEEDED, all in one transaction."""
        with self.db.write(durable=True) as conn:
            self.results.insert(conn, job_id, scores, class_names, summary)
            conn.execute(
                "UPDATE jobs SET run_info_json = ? WHERE job_id = ?", (records.encode(run_info), job_id)
            )
            return self._transition(conn, job_id, JobState.SUCCEEDED, now, message="scores are ready")

    def request_cancel(self, job_id: str, now: float) -> tuple[Job, JobEvent | None]:
        """Cancel a queued job at once, or flag a running one for its worker; finished jobs are kept."""
        with self.db.write(durable=True) as conn:
            state = JobState(self._row(conn, job_id)["state"])
            event = None
            if state is JobState.QUEUED:
                event = self._transition(
                    conn, job_id, JobState.CANCELLED, now, message="cancelled while queued"
                )
            elif state is JobState.RUNNING:
                conn.execute("UPDATE jobs SET cancel_requested = 1 WHERE job_id = ?", (job_id,))
            return records.job_from_row(self._row(conn, job_id)), event

    def delete_job(self, job_id: str) -> None:
        with self.db.write(durable=True) as conn:
            state = JobState(self._row(conn, job_id)["state"])
            if state not in TERMINAL_STATES:
                raise FailedPrecondition(
                    f"scoring job {job_id!r} is {state.value.upper()}; cancel it and wait for it to finish "
                    "before deleting it",
                    reason="JOB_NOT_FINISHED",
                    resource_type="scoring_job",
                    resource_name=job_id,
                )
            for table in ("events", "scores", "class_names", "summaries", "jobs"):
                conn.execute(f"DELETE FROM {table} WHERE job_id = ?", (job_id,))

    def recover(self, now: float, *, max_attempts: int) -> Recovery:
        """Requeue the jobs an earlier process left QUEUED or RUNNING.

        A job still RUNNING here was interrupted by a crash (a graceful stop puts it back to QUEUED).
        `crashes` counts the crashes in a row that the job may have caused (`jobs.crashes`: the
        interrupted attempt got no further in training than an earlier one); after `max_attempts`
        of them it is FAILED rather than retried forever. Jobs whose cancellation was requested are
        CANCELLED.
        """
        recovery = Recovery()
        with self.db.write(durable=True) as conn:
            rows = conn.execute(
                "SELECT job_id, state, crashes, cancel_requested, dataset_uri, progress_json FROM jobs "
                "WHERE state IN ('queued', 'running') ORDER BY seq"
            ).fetchall()
            for row in rows:
                job_id = row["job_id"]
                if row["cancel_requested"]:
                    self._transition(
                        conn, job_id, JobState.CANCELLED, now, message="cancelled before a restart"
                    )
                    recovery.finished.append(JobState.CANCELLED)
                    continue
                if row["state"] == JobState.RUNNING.value:
                    progressed = attempt_progressed(self.events.read(conn, job_id, 0))
                    crashes = 0 if progressed else row["crashes"] + 1
                    conn.execute("UPDATE jobs SET crashes = ? WHERE job_id = ?", (crashes, job_id))
                    if crashes >= max_attempts:
                        progress = records.decode_progress(row["progress_json"])
                        error = too_many_crashes(row["dataset_uri"], progress, crashes)
                        self._transition(
                            conn, job_id, JobState.FAILED, now, error=error, message=error.message
                        )
                        recovery.finished.append(JobState.FAILED)
                        continue
                    counted = (
                        "the job trained further than before, so this does not count against it"
                        if progressed
                        else f"crash {crashes} of {max_attempts} allowed without progress"
                    )
                    self._transition(
                        conn,
                        job_id,
                        JobState.QUEUED,
                        now,
                        message=f"the server stopped during the job ({counted}); it resumes from its "
                        "last checkpoint",
                    )
                recovery.queued.append(job_id)
        return recovery

    # -- reads ------------------------------------------------------------------------------------

    def get_job(self, job_id: str) -> Job:
        return records.job_from_row(self._row(self.db.connection(), job_id))

    def job_for_request(self, spec: JobSpec) -> Job | None:
        """The job created earlier for spec's request_id, if any (see create_job)."""
        return self._existing_request(self.db.connection(), spec)

    def list_jobs(self, state: JobState | None, after_seq: int | None, limit: int) -> list[tuple[int, Job]]:
        """Jobs newest first, as (row number, job), strictly older than `after_seq` when given."""
        sql = "SELECT * FROM jobs WHERE seq < ?"
        params: list[object] = [after_seq if after_seq is not None else 2**62]
        if state is not None:
            sql += " AND state = ?"
            params.append(state.value)
        rows = self.db.connection().execute(sql + " ORDER BY seq DESC LIMIT ?", (*params, limit)).fetchall()
        return [(row["seq"], records.job_from_row(row)) for row in rows]

    def job_with_events(self, job_id: str, after_sequence: int) -> tuple[Job, list[JobEvent]]:
        """The job and its events after `after_sequence`, from one consistent snapshot."""
        with self.db.read() as conn:
            return records.job_from_row(self._row(conn, job_id)), self.events.read(
                conn, job_id, after_sequence
            )

    def state_counts(self) -> dict[JobState, int]:
        rows = self.db.connection().execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        counts = dict.fromkeys(JobState, 0)
        counts.update({JobState(state): count for state, count in rows})
        return counts
