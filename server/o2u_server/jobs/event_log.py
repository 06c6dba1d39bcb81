"""Each job's stored event log: one row per event, numbered 1, 2, 3, ... per job.

`append` takes the next sequence number from the job row inside the caller's transaction (the
UPDATE locks the row, so concurrent writers of one job take turns and numbers never repeat or skip),
so a state change and the event that reports it commit together and the log never disagrees with
the job. On PostgreSQL the same transaction notifies every replica (`event <job_id> <sequence>`),
delivered when it commits; the table stays the truth, which watchers read any suffix of.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import ColumnElement, Connection, select, update

from o2u_server.domain import EventType, JobError, JobEvent, JobState, Progress
from o2u_server.jobs import records
from o2u_server.jobs.database import Database
from o2u_server.jobs.tables import events, jobs

__all__ = ["EventLog"]


class EventLog:
    """Reads and appends the events table; appends happen inside the caller's transaction."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def append(
        self,
        conn: Connection,
        job_id: str,
        now: float,
        kind: EventType,
        state: JobState,
        *,
        progress: Progress | None = None,
        error: JobError | None = None,
        message: str = "",
        where: ColumnElement[bool] | None = None,
        changes: Mapping[str, Any] | None = None,
    ) -> JobEvent | None:
        """Append the event; with `changes`, update the job row in the same statement, and with
        `where`, only if the row matches it (None when it does not: nothing is appended)."""
        statement = update(jobs).where(jobs.c.job_id == job_id)
        if where is not None:
            statement = statement.where(where)
        values = {**(changes or {}), "last_sequence": jobs.c.last_sequence + 1}
        sequence = conn.execute(
            statement.values(**values).returning(jobs.c.last_sequence)
        ).scalar_one_or_none()
        if sequence is None:
            return None
        event = JobEvent(job_id, sequence, now, kind, state, progress, error, message)
        conn.execute(
            events.insert().values(
                job_id=job_id,
                sequence=sequence,
                event_time=now,
                type=kind.value,
                state=state.value,
                progress_json=records.encode(progress),
                error_json=records.encode(error),
                message=message,
            )
        )
        self._db.notify(conn, f"event {job_id} {sequence}")
        return event

    @staticmethod
    def read(conn: Connection, job_id: str, after_sequence: int, until: int | None = None) -> list[JobEvent]:
        """The events after `after_sequence` (up to and including `until`), in order."""
        query = select(events).where(events.c.job_id == job_id, events.c.sequence > after_sequence)
        if until is not None:
            query = query.where(events.c.sequence <= until)
        rows = conn.execute(query.order_by(events.c.sequence)).mappings()
        return [records.event_from_row(row) for row in rows]

    def after(self, job_id: str, after_sequence: int, until: int | None = None) -> list[JobEvent]:
        def read() -> list[JobEvent]:
            with self._db.read() as conn:
                return self.read(conn, job_id, after_sequence, until)

        return self._db.retry(read)
