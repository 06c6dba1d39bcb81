"""The webhook delivery queue in the job store, on SQLite and PostgreSQL: a job with a webhook gets
one delivery row with its final state (none without a webhook), a claimed delivery is held from
other replicas, a row another replica has locked is skipped rather than waited for, and recorded
attempts show on the job and close or reschedule the delivery."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from sqlalchemy import select

from o2u_server.domain import JobState, WebhookAttempt
from o2u_server.jobs.store import JobStore
from o2u_server.jobs.tables import webhook_deliveries
from tests.o2u_server.jobs.store_testing import SPEC, job_id

HOOKED = dataclasses.replace(SPEC, request_id=None, webhook_url="https://hooks.example.com/o2u")


def _cancelled(store: JobStore, n: int, spec: object = HOOKED) -> str:
    store.create_job(job_id(n), spec, 10.0 + n, max_queued=100)  # type: ignore[arg-type]
    store.request_cancel(job_id(n), 20.0 + n)
    return job_id(n)


def test_a_final_state_queues_one_delivery(store: JobStore, second: JobStore) -> None:
    hooked = _cancelled(store, 1)
    _cancelled(store, 2, dataclasses.replace(SPEC, request_id=None))  # no webhook: nothing queued
    due = store.webhooks.claim(40.0, now=100.0)
    assert due is not None
    assert (due.job_id, due.url, due.event_type, due.attempt) == (
        hooked,
        "https://hooks.example.com/o2u",
        "io.o2u.scoring.job.cancelled",
        1,
    )
    assert second.webhooks.claim(40.0, now=100.0) is None  # held by the first claim
    assert store.webhooks.claim(40.0, now=139.0) is None
    store.webhooks.record(
        due, WebhookAttempt(1, 101.0, 500, "http_error", "HTTP 500"), retry_in=4.0, now=101.0
    )
    assert second.webhooks.claim(40.0, now=104.0) is None
    again = second.webhooks.claim(40.0, now=105.0)
    assert again is not None
    assert (again.delivery_id, again.attempt) == (due.delivery_id, 2)
    second.webhooks.record(
        again, WebhookAttempt(2, 106.0, 200, "delivered", final=True), retry_in=None, now=106.0
    )
    assert store.webhooks.claim(40.0, now=10_000.0) is None  # delivered: closed
    attempts = store.get_job(hooked).webhook_deliveries
    assert [(a.attempt, a.outcome, a.http_status, a.final) for a in attempts] == [
        (1, "http_error", 500, False),
        (2, "delivered", 200, True),
    ]
    assert store.get_job(hooked).state is JobState.CANCELLED
    store.delete_job(hooked)
    with store.db.read() as conn:
        assert conn.execute(select(webhook_deliveries)).first() is None


def test_a_locked_delivery_is_skipped_not_waited_for(
    store: JobStore, second: JobStore, database: str | Path
) -> None:
    if isinstance(database, Path):
        return  # one SQLite file has one writer; the skip is PostgreSQL's FOR UPDATE SKIP LOCKED
    first, other = _cancelled(store, 1), _cancelled(store, 2)
    with store.db.write() as conn:
        locked = conn.execute(
            select(webhook_deliveries.c.job_id).where(webhook_deliveries.c.job_id == first).with_for_update()
        ).scalar_one()
        assert locked == first
        due = second.webhooks.claim(40.0, now=100.0)  # would block without SKIP LOCKED
        assert due is not None
        assert due.job_id == other


def test_claims_and_retries_run_on_the_database_clock(store: JobStore, second: JobStore) -> None:
    """Without an explicit time, due and held are the database's: a replica whose own clock runs
    ahead can never take a delivery another replica holds."""
    hooked = _cancelled(store, 1)  # queued at time 21: due long ago on any clock
    due = store.webhooks.claim(40.0)
    assert due is not None
    assert due.job_id == hooked
    assert second.webhooks.claim(40.0) is None  # held, whatever time second's host says it is
    with store.db.read() as conn:
        database_now = conn.execute(select(store.db.clock())).scalar_one()
        held_until = conn.execute(select(webhook_deliveries.c.next_attempt_at)).scalar_one()
    assert database_now <= held_until <= database_now + 41.0
    store.webhooks.record(due, WebhookAttempt(1, 0.0, 500, "http_error", "HTTP 500"), retry_in=3_600.0)
    with store.db.read() as conn:
        retry_at = conn.execute(select(webhook_deliveries.c.next_attempt_at)).scalar_one()
    assert database_now + 3_599.0 <= retry_at <= database_now + 3_700.0
    assert second.webhooks.claim(40.0) is None  # not due for an hour on the database's clock


def test_a_claim_leaves_the_deliveries_to_busy_destinations(store: JobStore) -> None:
    urls = [
        "https://busy.example/o2u",  # the oldest: skipped while its destination is busy
        "https://busy.example?job=1",
        "https://busy.example",
        "https://busy.example.org/o2u",  # another host that starts with the busy one's name
        "https://busy_example/o2u",  # a LIKE wildcard in the busy name must not match this
        "https://busy.example:8443/o2u",  # another port: another destination
    ]
    for n, url in enumerate(urls, start=1):
        _cancelled(store, n, dataclasses.replace(HOOKED, webhook_url=url))
    excluding = ["https://busy.example", "https://busyXexample"]
    claimed = []
    while (due := store.webhooks.claim(40.0, now=100.0, excluding=excluding)) is not None:
        claimed.append(due.url)
    assert claimed == urls[3:]
    first = store.webhooks.claim(40.0, now=100.0)
    assert first is not None
    assert first.url == urls[0]  # nothing excluded: the oldest
