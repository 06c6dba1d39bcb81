"""The lease keeper: one thread per replica that keeps its running jobs' leases alive.

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

from o2u_server.errors import ServiceError
from o2u_server.jobs.claims import ClaimStore, Lease, Recovery

__all__ = ["LeaseKeeper"]

logger = logging.getLogger(__name__)


class LeaseKeeper:
    """Renews `held()` leases every `lease_seconds / 3`; see the module docstring."""

    def __init__(
        self,
        claims: ClaimStore,
        *,
        lease_seconds: float,
        max_attempts: int,
        held: Callable[[], list[Lease]],
        on_lost: Callable[[Lease], None],
        on_cancel: Callable[[Lease], None],
        after_round: Callable[[Recovery], None],
    ) -> None:
        self._claims = claims
        self.lease_seconds = lease_seconds
        self.interval = lease_seconds / 3
        self._max_attempts = max_attempts
        self._held, self._on_lost, self._on_cancel, self._after_round = held, on_lost, on_cancel, after_round
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
                logger.exception("lease keeper round failed; retrying next round")

    def round(self) -> None:
        """Renew, pass on cancels, stop lost attempts, requeue orphans (also callable from tests)."""
        for lease in self._held():
            try:
                cancel = self._claims.renew_lease(lease, self.lease_seconds)
            except ServiceError as error:  # the database is unreachable: try again next round
                logger.warning("could not renew a lease: %s", error.message, extra={"job_id": lease.job_id})
                continue
            if cancel is None:
                logger.warning(
                    "lost the lease of a running job; stopping it without writing",
                    extra={"job_id": lease.job_id, "attempt": lease.attempt},
                )
                self._on_lost(lease)
            elif cancel:
                self._on_cancel(lease)
        recovery = self._claims.requeue_expired(time.time(), max_attempts=self._max_attempts)
        for job_id in recovery.queued:
            logger.info("requeued a job whose lease expired", extra={"job_id": job_id})
        self._after_round(recovery)
