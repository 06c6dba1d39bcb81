"""The two steps every job write shares: reading the job's row, and changing its state together with
the event that reports it (one UPDATE and one appended event, in the caller's transaction), and for
a final state the job's completion webhook delivery. A job that ends without success keeps no score
rows: the ones an attempt wrote before it stopped (SQLite writes them ahead of the final state, see
`results`) are deleted with the change."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import ColumnElement, Connection, bindparam, delete, select

from o2u_server.domain import TERMINAL_STATES, EventType, JobError, JobEvent, JobState
from o2u_server.errors import NotFound
from o2u_server.jobs import records
from o2u_server.jobs.event_log import EventLog
from o2u_server.jobs.tables import jobs, scores
from o2u_server.jobs.webhook_store import enqueue

__all__ = ["job_row", "not_found", "transition"]


def not_found(job_id: str) -> NotFound:
    return NotFound(
        f"scoring job {job_id!r} does not exist (it may have been deleted)",
        reason="JOB_NOT_FOUND",
        resource_type="scoring_job",
        resource_name=job_id,
    )


# Built once: the hottest reads of the store. A statement built per call costs as much again as the
# query itself on SQLite (construction and its cache key, before SQLAlchemy finds the compiled form).
_JOB = select(jobs).where(jobs.c.job_id == bindparam("job_id"))
_JOB_LOCKED = _JOB.with_for_update()


def job_row(conn: Connection, job_id: str, *, lock: bool = False) -> Mapping[Any, Any]:
    """The job's row (locked until the transaction ends when `lock`); NotFound if there is none."""
    row = conn.execute(_JOB_LOCKED if lock else _JOB, {"job_id": job_id}).mappings().first()
    if row is None:
        raise not_found(job_id)
    return row


def transition(
    conn: Connection,
    log: EventLog,
    job_id: str,
    state: JobState,
    now: float,
    *,
    error: JobError | None = None,
    message: str = "",
    where: ColumnElement[bool] | None = None,
    **values: Any,
) -> JobEvent | None:
    """Move the job to `state` (with extra column `values`) and append the STATE_CHANGED event.

    With `where`, the change happens only if the row also matches it; None when it does not."""
    changes: dict[str, Any] = {"state": state.value, "update_time": now, **values}
    if state in TERMINAL_STATES:
        changes.update(end_time=now, lease_expires_at=None)
    if error is not None:
        changes["error_json"] = records.encode(error)
    event = log.append(
        conn,
        job_id,
        now,
        EventType.STATE_CHANGED,
        state,
        error=error,
        message=message,
        where=where,
        changes=changes,
    )
    if event is not None and state in TERMINAL_STATES:
        enqueue(conn, job_id, state, now)  # the completion webhook, in the same transaction
        if state is not JobState.SUCCEEDED:
            conn.execute(delete(scores).where(scores.c.job_id == job_id))
    return event
