"""This replica's running attempts (`Attempts`: each one's lease and stop flags) and the lease
keeper, one thread per replica that keeps their leases alive.

Every third of `lease_seconds` it renews the lease of each job this replica runs (an epoch may take
longer than a lease, so renewing from the training loop would not do), hands on a cancel requested
on any replica (the periodic check behind the NOTIFY shortcut), and stops an attempt whose lease
is gone: it expired while this replica was paused or cut off, and another replica may own the job
now. It then requeues the jobs whose lease expired anywhere (`ClaimStore.requeue_expired`), and
lets the runner refresh the queue metrics from the database. A database that does not answer only
delays a round: the fenced writes are what keep a stale attempt from doing harm.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from o2u_server.errors import ServiceError
from o2u_server.jobs.claims import ClaimStore, Lease, Recovery

__all__ = ["Attempt", "Attempts", "LeaseKeeper"]

logger = logging.getLogger(__name__)


@dataclass
class Attempt:
    """A running attempt's lease, and the flags its worker polls between batches."""

    lease: Lease
    cancel: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)
    lost: threading.Event = field(default_factory=threading.Event)  # the lease is gone: write nothing

    def requested(self) -> bool:
        return self.cancel.is_set() or self.stop.is_set() or self.lost.is_set()


class Attempts:
    """The attempts this replica runs, by job id; thread-safe. A job has one entry, its newest
    attempt's: an older attempt of the job still winding down here (its lease lost, then the job
    claimed again by another of this replica's workers) is flagged lost when the new one is added,
    and its exit leaves the new one's entry alone, so the keeper goes on renewing it."""

    def __init__(self) -> None:
        self._running: dict[str, Attempt] = {}
        self._lock = threading.Lock()
        self._stopping = False

    def add(self, lease: Lease) -> Attempt:
        attempt = Attempt(lease)
        with self._lock:
            older = self._running.get(lease.job_id)
            self._running[lease.job_id] = attempt
            if self._stopping:
                attempt.stop.set()  # stop_all() ran between the claim and here
        if older is not None:
            older.lost.set()  # the store gave the job to `lease`: the older attempt's is gone
        return attempt

    def remove(self, lease: Lease) -> None:
        """Forget `lease`'s attempt, unless a newer attempt of its job has replaced it."""
        with self._lock:
            attempt = self._running.get(lease.job_id)
            if attempt is not None and attempt.lease == lease:
                del self._running[lease.job_id]

    def signal(self, job_id: str, flag: str, lease: Lease | None = None) -> None:
        """Set `flag` (cancel, stop or lost) of the job's attempt here, if it is `lease`'s."""
        with self._lock:
            attempt = self._running.get(job_id)
        if attempt is not None and (lease is None or attempt.lease == lease):
            getattr(attempt, flag).set()

    def leases(self) -> list[Lease]:
        with self._lock:
            return [attempt.lease for attempt in self._running.values()]

    def stop_all(self) -> None:
        with self._lock:
            self._stopping = True
            for attempt in self._running.values():
                attempt.stop.set()


class LeaseKeeper:
    """Renews the leases of `attempts` every `lease_seconds / 3`; see the module docstring."""

    def __init__(
        self,
        claims: ClaimStore,
        attempts: Attempts,
        *,
        lease_seconds: float,
        max_attempts: int,
        after_round: Callable[[Recovery], None],
        store_reached: Callable[[bool], None] = lambda reached: None,
    ) -> None:
        self._claims, self._attempts = claims, attempts
        self._store_reached = store_reached
        self.lease_seconds = lease_seconds
        self.interval = lease_seconds / 3
        self._max_attempts = max_attempts
        self._after_round = after_round
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="o2u-lease-keeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.lease_seconds + 5)

    def _run(self) -> None:
        while not self._stopping.wait(self.interval):
            try:
                self.round()
            except Exception:
                self._store_reached(False)
                logger.exception("lease keeper round failed; retrying next round")

    def round(self) -> None:
        """Renew, pass on cancels, stop lost attempts, requeue orphans (also callable from tests);
        then tell `store_reached` whether every read and write of the round reached the store."""
        reached = True
        for lease in self._attempts.leases():
            try:
                cancel = self._claims.renew_lease(lease, self.lease_seconds)
            except ServiceError as error:  # the database is unreachable: try again next round
                logger.warning("could not renew a lease: %s", error.message, extra={"job_id": lease.job_id})
                reached = False
                continue
            if cancel is None:
                logger.warning(
                    "lost the lease of a running job; stopping it without writing",
                    extra={"job_id": lease.job_id, "attempt": lease.attempt},
                )
                self._attempts.signal(lease.job_id, "lost", lease)
            elif cancel:
                self._attempts.signal(lease.job_id, "cancel", lease)
        recovery = self._claims.requeue_expired(time.time(), max_attempts=self._max_attempts)
        for job_id in recovery.queued:
            logger.info("requeued a job whose lease expired", extra={"job_id": job_id})
        self._after_round(recovery)
        self._store_reached(reached)
