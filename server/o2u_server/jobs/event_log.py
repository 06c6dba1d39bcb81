"""Each job's stored event log: one row per event, numbered 1, 2, 3, ... per job.

`append` takes the next sequence number from the job row inside the caller's transaction, so a state
change and the event that reports it commit together and the log never disagrees with the job;
reads return any suffix of the log, which is how a watcher replays what it missed.
"""

from __future__ import annotations

import sqlite3

from o2u_server.domain import EventType, JobError, JobEvent, JobState, Progress
from o2u_server.jobs import records
from o2u_server.jobs.database import Database

__all__ = ["EventLog"]


class EventLog:
    """Reads and appends the events table; appends happen inside the caller's transaction."""

    def __init__(self, db: Database) -> None:
        self._db = db

    @staticmethod
    def append(
        conn: sqlite3.Connection,
        job_id: str,
        now: float,
        kind: EventType,
        state: JobState,
        *,
        progress: Progress | None = None,
        error: JobError | None = None,
        message: str = "",
    ) -> JobEvent:
        (sequence,) = conn.execute(
            "UPDATE jobs SET last_sequence = last_sequence + 1 WHERE job_id = ? RETURNING last_sequence",
            (job_id,),
        ).fetchone()
        event = JobEvent(job_id, sequence, now, kind, state, progress, error, message)
        conn.execute(
            "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                job_id,
                sequence,
                now,
                kind.value,
                state.value,
                records.encode(progress),
                records.encode(error),
                message,
            ),
        )
        return event

    @staticmethod
    def read(
        conn: sqlite3.Connection, job_id: str, after_sequence: int, until: int | None = None
    ) -> list[JobEvent]:
        """The events after `after_sequence` (up to and including `until`), in order."""
        rows = conn.execute(
            "SELECT * FROM events WHERE job_id = ? AND sequence > ? AND sequence <= ? ORDER BY sequence",
            (job_id, after_sequence, until if until is not None else 2**62),
        ).fetchall()
        return [records.event_from_row(row) for row in rows]

    def after(self, job_id: str, after_sequence: int, until: int | None = None) -> list[JobEvent]:
        return self.read(self._db.connection(), job_id, after_sequence, until)
