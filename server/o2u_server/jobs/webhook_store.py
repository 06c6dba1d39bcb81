"""The durable queue of completion webhooks: a delivery row is written in the transaction that gives
a job its final state (so the result and its notice are never apart), and the deliverer
(`jobs/webhooks.py`) claims due rows, records every attempt on them and reschedules or closes them.

A claim moves the row's next attempt past the send timeout, in one transaction that locks the row
with FOR UPDATE SKIP LOCKED on PostgreSQL: several replicas polling the same database never send one
delivery at the same time, and a replica that dies mid-send leaves the row to be retried once the
claim runs out. Claims and retries are timed on the database's clock, as leases are, so replicas
whose clocks disagree still hold a claimed delivery from each other for its whole hold. Attempts are
a small JSON list on the row, read whole for GetScoringJob.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import ColumnElement, Connection, and_, bindparam, or_, select, update

from o2u_server.domain import JobState, WebhookAttempt
from o2u_server.jobs.database import Database
from o2u_server.jobs.tables import jobs, webhook_deliveries

__all__ = ["Due", "WebhookStore", "enqueue", "event_type", "job_attempts"]

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
_table = webhook_deliveries


def event_type(state: JobState) -> str:
    """The CloudEvents type of a job's final state, e.g. io.o2u.scoring.job.succeeded."""
    return f"io.o2u.scoring.job.{state.value}"


def enqueue(conn: Connection, job_id: str, state: JobState, now: float) -> None:
    """Queue the job's completion event if it has a webhook (in the caller's transaction)."""
    url = conn.execute(select(jobs.c.webhook_url).where(jobs.c.job_id == job_id)).scalar_one_or_none()
    if not url:
        return
    conn.execute(
        _table.insert().values(
            delivery_id=str(uuid.uuid4()),
            job_id=job_id,
            url=url,
            event_type=event_type(state),
            state=PENDING,
            attempts=0,
            next_attempt_at=now,
            create_time=now,
            attempts_json="[]",
        )
    )


def _attempts(text: str) -> list[WebhookAttempt]:
    return [WebhookAttempt(**item) for item in json.loads(text)]


_ATTEMPTS = (
    select(_table.c.attempts_json)
    .where(_table.c.job_id == bindparam("job_id"))
    .order_by(_table.c.create_time)
)


def job_attempts(conn: Connection, job_id: str) -> tuple[WebhookAttempt, ...]:
    """Every delivery attempt of the job's webhook, oldest first."""
    rows = conn.execute(_ATTEMPTS, {"job_id": job_id})
    return tuple(attempt for (text,) in rows for attempt in _attempts(text))


@dataclass(frozen=True)
class Due:
    """A claimed delivery: send it, then `record` the attempt."""

    delivery_id: str
    job_id: str
    url: str
    event_type: str
    create_time: float
    attempt: int  # the number of the attempt about to be made


def _to(origin: str) -> ColumnElement[bool]:
    """True for a URL that is not under `origin` ("https://host:port": the origin itself, or it
    followed by a path, a query or a fragment), so "https://a.example" leaves "https://a.example.org"."""
    url = _table.c.url
    return and_(
        url != origin,
        ~or_(*(url.startswith(origin + mark, autoescape=True) for mark in "/?#")),
    )


class WebhookStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def _clock(self, now: float | None) -> float | ColumnElement[float]:
        """`now` when given (tests step through time), else the database's clock."""
        return self.db.clock() if now is None else now

    def claim(
        self, hold_seconds: float, *, now: float | None = None, excluding: Collection[str] = ()
    ) -> Due | None:
        """The oldest due delivery, held for `hold_seconds` against other senders; None if none is due.
        Due and held are on the database's clock unless `now` is given. A delivery to one of the
        `excluding` destinations (webhooks.destination: scheme and host with its port, as the URL
        spells them) is left for a later claim."""
        clock = self._clock(now)
        busy = [_to(origin) for origin in excluding]

        def claim() -> Due | None:
            with self.db.write() as conn:
                query = (
                    select(_table)
                    .where(_table.c.state == PENDING, _table.c.next_attempt_at <= clock, *busy)
                    .order_by(_table.c.next_attempt_at)
                    .limit(1)
                    .with_for_update(skip_locked=True)
                )
                row: Mapping[Any, Any] | None = conn.execute(query).mappings().first()
                if row is None:
                    return None
                conn.execute(
                    update(_table)
                    .where(_table.c.delivery_id == row["delivery_id"])
                    .values(next_attempt_at=clock + hold_seconds)
                )
                return Due(
                    row["delivery_id"],
                    row["job_id"],
                    row["url"],
                    row["event_type"],
                    row["create_time"],
                    row["attempts"] + 1,
                )

        return self.db.retry(claim)

    def record(
        self, due: Due, attempt: WebhookAttempt, retry_in: float | None, *, now: float | None = None
    ) -> None:
        """Store the attempt; the delivery is closed when `attempt.final`, else retried `retry_in`
        seconds from now (the database's clock unless `now` is given)."""
        clock = self._clock(now)

        def write() -> None:
            with self.db.write(durable=True) as conn:
                text = conn.execute(
                    select(_table.c.attempts_json).where(_table.c.delivery_id == due.delivery_id)
                ).scalar_one_or_none()
                if text is None:
                    return  # the job was deleted meanwhile
                attempts = [*json.loads(text), asdict(attempt)]
                if attempt.final:
                    state = DELIVERED if attempt.outcome == "delivered" else FAILED
                else:
                    state = PENDING
                values: dict[str, Any] = {
                    "state": state,
                    "attempts": attempt.attempt,
                    "attempts_json": json.dumps(attempts),
                }
                if retry_in is not None:
                    values["next_attempt_at"] = clock + retry_in
                conn.execute(update(_table).where(_table.c.delivery_id == due.delivery_id).values(values))

        self.db.retry(write)
