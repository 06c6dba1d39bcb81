"""What other replicas did, as it commits: PostgreSQL's LISTEN/NOTIFY on one connection per replica.

The store notifies inside its transactions (`Database.notify`), so a notice arrives only once what
it announces is committed: `event <job_id> <sequence>` (a job stored an event: wake its watchers,
who read the events table), `cancel <job_id>` (a cancel was requested: stop the job if it runs
here) and `queued <job_id>` (a job waits: wake the idle workers). Notices are a shortcut, never the
truth: when the connection breaks (a database restart), the listener reconnects and wakes every
watcher and worker to read the store, and watchers and workers poll it anyway now and then.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import psycopg
from sqlalchemy import URL

from o2u_server.jobs.database import NOTIFY_CHANNEL

__all__ = ["Listener"]

logger = logging.getLogger(__name__)


class Listener:
    """A daemon thread that LISTENs and dispatches notices to three callbacks."""

    def __init__(
        self,
        url: URL,
        *,
        on_event: Callable[[str | None, int | None], None],
        on_cancel: Callable[[str], None],
        on_queued: Callable[[], None],
    ) -> None:
        self._conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._on_event, self._on_cancel, self._on_queued = on_event, on_cancel, on_queued
        self._stopping = threading.Event()
        self._listening = threading.Event()
        self._thread = threading.Thread(target=self._run, name="o2u-listener", daemon=True)

    def start(self, timeout: float = 10.0) -> None:
        """Start listening; returns once LISTEN is in place (or after `timeout`, still trying)."""
        self._thread.start()
        self._listening.wait(timeout)

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        delay = 0.1
        while not self._stopping.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    if self._listening.is_set():  # a reconnect: what was notified meanwhile is lost
                        self._on_event(None, None)
                        self._on_queued()
                    self._listening.set()
                    delay = 0.1
                    while not self._stopping.is_set():
                        for notice in conn.notifies(timeout=0.5):
                            self._dispatch(notice.payload)
            except psycopg.Error as error:
                logger.warning("job notifications interrupted, reconnecting: %s", type(error).__name__)
                self._stopping.wait(delay)
                delay = min(2.0, delay * 2)

    def _dispatch(self, payload: str) -> None:
        kind, _, rest = payload.partition(" ")
        try:
            if kind == "event":
                job_id, _, sequence = rest.partition(" ")
                self._on_event(job_id, int(sequence))
            elif kind == "cancel":
                self._on_cancel(rest)
            elif kind == "queued":
                self._on_queued()
        except Exception:
            logger.exception("a job notification could not be handled", extra={"payload": payload})
