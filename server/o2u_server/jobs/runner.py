"""The job runner: worker threads that claim queued jobs from the store and run them through the engine.

Each worker (one per device slot) claims the oldest queued job under a lease (`jobs.claims`),
whichever replica accepted it; an idle worker waits until a job is submitted here, another replica
announces one (`jobs.notifications`) or a third of the lease has passed. A worker claims nothing
while the local state volume is below `min_free_state_bytes` (`jobs.state_volume`): a replica with
room takes the job instead. The claimed attempt runs on the worker's thread, so training never
blocks the event loop (`jobs.execution`: load, train, rank, store, every write fenced by the lease;
with `training_isolation: process` the training itself runs in the slot's training process,
started and stopped with the runner).
The lease keeper (`jobs.leases`) renews the leases, passes on cancels and requeues the jobs whose
lease expired anywhere. Stopping the runner (server shutdown) asks running jobs to stop at the next
batch or read chunk; they go back to QUEUED with their last epoch checkpoint (uploaded first, with
shared checkpoints) and resume on whichever replica claims them next. A cancelled job ends
CANCELLED instead, and its checkpoints are deleted.
"""

from __future__ import annotations

import logging
import threading
import time

from o2u_server.domain import Job, JobEvent
from o2u_server.errors import StateStoreFull
from o2u_server.jobs.checkpoints import CheckpointStore
from o2u_server.jobs.engine import Engine
from o2u_server.jobs.events import EventHub
from o2u_server.jobs.execution import Execution
from o2u_server.jobs.leases import Attempts, LeaseKeeper
from o2u_server.jobs.state_volume import StateVolume
from o2u_server.jobs.store import JobStore, Lease, Recovery
from o2u_server.jobs.workers import job_engine
from o2u_server.metrics import ServerMetrics
from o2u_server.settings import Settings
from o2u_server.storage import Storage

__all__ = ["JobRunner"]

logger = logging.getLogger(__name__)


class JobRunner:
    """A fixed pool of worker threads, one per device slot, claiming jobs from the store."""

    def __init__(
        self,
        *,
        settings: Settings,
        store: JobStore,
        storage: Storage,
        checkpoints: CheckpointStore,
        volume: StateVolume,
        metrics: ServerMetrics,
        hub: EventHub,
        devices: list[str],
        owner: str,
        server_version: str,
        engine: Engine | None = None,
    ) -> None:
        self._store = store
        self._checkpoints = checkpoints
        self._volume = volume
        self.owner = owner
        self._metrics = metrics
        self._devices = devices
        self._lease_seconds = settings.lease_seconds
        self._attempts = Attempts()
        self._work_waiting = threading.Condition()
        self._wakeups = 0  # bumped by wake(): idle workers look for a job again
        self._threads: list[threading.Thread] = []
        self._closing = threading.Event()
        self._engine = engine or job_engine(settings)
        self._execution = Execution(
            settings=settings,
            store=store,
            storage=storage,
            checkpoints=checkpoints,
            volume=volume,
            metrics=metrics,
            hub=hub,
            server_version=server_version,
            engine=self._engine,
            closing=self._closing,
        )
        self._keeper = LeaseKeeper(
            store.claims,
            self._attempts,
            lease_seconds=settings.lease_seconds,
            max_attempts=settings.max_job_attempts,
            after_round=self._after_round,
            store_reached=lambda reached: self._metrics.job_store_up.set(int(reached)),
        )

    # -- lifecycle (called from the event loop) ---------------------------------------------------

    def start(self) -> None:
        """Start the workers (they claim queued jobs, oldest first) and the lease keeper."""
        self._metrics.worker_slots.set(len(self._devices))
        self._engine.start(self._devices)
        for index, device in enumerate(self._devices):
            thread = threading.Thread(
                target=self._work, args=(device,), name=f"o2u-worker-{index}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        self._keeper.start()

    def submit(self, job_id: str) -> None:
        """A job was queued: wake an idle worker (any replica's may claim it)."""
        self.wake()

    def wake(self) -> None:
        with self._work_waiting:
            self._wakeups += 1
            self._work_waiting.notify_all()

    def cancel(self, job_id: str) -> None:
        """Ask a job to stop as CANCELLED if it runs here (the store already holds the request)."""
        self._attempts.signal(job_id, "cancel")

    def stop(self, timeout: float) -> bool:
        """Stop taking jobs, ask running ones to checkpoint and stop; True if all workers ended in time."""
        self._closing.set()
        self._attempts.stop_all()
        self.wake()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stopped = not any(thread.is_alive() for thread in self._threads)
        if stopped:
            self._keeper.stop()  # else it keeps renewing the leases of the attempts still running
        self._engine.close()  # the idle training processes; one still running stops when its call ends
        return stopped

    # -- worker threads ---------------------------------------------------------------------------

    def _work(self, device: str) -> None:
        while not self._closing.is_set():
            self._volume.wait_for_space(self._closing)
            with self._work_waiting:
                seen = self._wakeups
            claimed = None
            if not self._closing.is_set():
                claimed = self._claim()
            if claimed is None:
                with self._work_waiting:
                    if self._wakeups == seen and not self._closing.is_set():
                        self._work_waiting.wait(self._keeper.interval)
                continue
            lease, job, event = claimed
            try:
                self._run(lease, job, event, device)
            except Exception:
                # Only bookkeeping failures (e.g. the store) get here; the worker must survive them.
                logger.exception("worker failed to run job", extra={"job_id": lease.job_id})

    def _claim(self) -> tuple[Lease, Job, JobEvent] | None:
        try:
            return self._store.claims.claim_job(self.owner, time.time(), lease_seconds=self._lease_seconds)
        except StateStoreFull as full:
            logger.error("worker could not claim a job: %s", full.message)
        except Exception:
            # The store failed (e.g. the database is down); the worker must survive it.
            logger.exception("worker could not claim a job")
        return None

    def _after_round(self, recovery: Recovery) -> None:
        """After the lease keeper's round: count and publish what it requeued (a job it ended -
        cancelled, or failed after too many crashes - loses its checkpoints), refresh the gauges."""
        for event in recovery.events:
            if event.terminal:
                self._metrics.jobs_finished.labels(state=event.state.value).inc()
                self._checkpoints.delete(event.job_id)
            self._execution.publish(event)
        self._metrics.count_jobs(self._store.state_counts)
        self._metrics.count_queue(self._store.queue_stats)
        if recovery.queued:
            self.wake()

    def _run(self, lease: Lease, job: Job, event: JobEvent, device: str) -> None:
        control = self._attempts.add(lease)
        self._metrics.job_claims.inc()
        self._metrics.jobs_running_here.inc()
        try:
            self._execution.finished(job, event)
            self._execution.run(job, control, device)
        finally:
            self._attempts.remove(lease)
            self._metrics.jobs_running_here.dec()
