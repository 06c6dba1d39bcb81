"""The job runner: worker threads that claim queued jobs from the store and run them through the engine.

Each worker (one per device slot) claims the oldest queued job under a lease (`jobs.claims`),
whichever replica accepted it; an idle worker waits until a job is submitted here, another replica
announces one (`jobs.notifications`) or a third of the lease has passed. A job runs load -> resolve
config -> train (the engine's stages, one PROGRESS event per epoch) -> rank -> store, in a worker
thread so training never blocks the event loop; every translation to and from the engine is in
`jobs.engine`. Every write the attempt makes is fenced by its lease: when one is refused
(`LeaseLost`), or the lease keeper (`jobs.leases`) finds the lease gone, the attempt stops at the
next batch without touching the job again, since another replica owns it now. Events reach
watchers through `EventHub.publish_threadsafe` after the store has committed them. Each job's
failure is caught and recorded as that job's FAILED state, so it cannot take a worker or another
job down. Stopping the runner (server shutdown) asks running jobs to stop at the next batch; they
go back to QUEUED with their last epoch checkpoint (uploaded first, with shared checkpoints) and
resume on whichever replica claims them next. A cancelled job ends CANCELLED instead, and its
checkpoints are deleted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from o2u_server.datasets import DatasetLimits, load_dataset
from o2u_server.domain import Job, JobError, JobEvent, JobState, Progress, Stage
from o2u_server.errors import Internal
from o2u_server.jobs.checkpoints import CheckpointStore
from o2u_server.jobs.engine import Cancelled, Engine, job_results, run_info, service_error
from o2u_server.jobs.events import EventHub
from o2u_server.jobs.leases import Attempt, Attempts, LeaseKeeper
from o2u_server.jobs.store import JobStore, Lease, LeaseLost, Recovery
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
        metrics: ServerMetrics,
        hub: EventHub,
        devices: list[str],
        owner: str,
        server_version: str,
        engine: Engine | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._storage = storage
        self._checkpoints = checkpoints
        self.owner = owner
        self._metrics = metrics
        self._hub = hub
        self._devices = devices
        self._server_version = server_version
        self._engine = engine or Engine()
        self._limits = DatasetLimits.from_settings(settings)
        self._lease_seconds = settings.lease_seconds
        self._attempts = Attempts()
        self._work_waiting = threading.Condition()
        self._wakeups = 0  # bumped by wake(): idle workers look for a job again
        self._threads: list[threading.Thread] = []
        self._closing = threading.Event()
        self._keeper = LeaseKeeper(
            store.claims,
            self._attempts,
            lease_seconds=settings.lease_seconds,
            max_attempts=settings.max_job_attempts,
            after_round=self._after_round,
        )

    # -- lifecycle (called from the event loop) ---------------------------------------------------

    def start(self) -> None:
        """Start the workers (they claim queued jobs, oldest first) and the lease keeper."""
        self._metrics.worker_slots.set(len(self._devices))
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
        return stopped

    # -- worker threads ---------------------------------------------------------------------------

    def _work(self, device: str) -> None:
        while not self._closing.is_set():
            with self._work_waiting:
                seen = self._wakeups
            try:
                claimed = self._store.claims.claim_job(
                    self.owner, time.time(), lease_seconds=self._lease_seconds
                )
            except Exception:
                # The store failed (e.g. the database is down); the worker must survive it.
                logger.exception("worker could not claim a job")
                claimed = None
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

    def _publish(self, event: JobEvent | None) -> None:
        if event is not None:
            self._hub.publish_threadsafe(event)

    def _finished(self, job: Job, event: JobEvent | None) -> None:
        """Account for a job's state change, then publish it: a watcher that sees the event and
        then scrapes /metrics must find the job counted."""
        if event is not None and event.terminal:
            self._metrics.jobs_finished.labels(state=event.state.value).inc()
            started = job.start_time if job.start_time is not None else job.create_time
            self._metrics.job_duration.labels(state=event.state.value).observe(
                max(0.0, event.event_time - started)
            )
        self._metrics.count_jobs(self._store.state_counts())
        self._publish(event)

    def _after_round(self, recovery: Recovery) -> None:
        """After the lease keeper's round: count and publish what it requeued, refresh the gauges."""
        for event in recovery.events:
            if event.terminal:
                self._metrics.jobs_finished.labels(state=event.state.value).inc()
            self._publish(event)
        self._metrics.count_jobs(self._store.state_counts())
        self._metrics.count_queue(*self._store.queue_stats(), now=time.time())
        if recovery.queued:
            self.wake()

    def _run(self, lease: Lease, job: Job, event: JobEvent, device: str) -> None:
        control = self._attempts.add(lease)
        self._metrics.job_claims.inc()
        self._metrics.jobs_running_here.inc()
        try:
            self._finished(job, event)
            self._attempt(job, control, device)
        finally:
            self._attempts.remove(lease)
            self._metrics.jobs_running_here.dec()

    def _attempt(self, job: Job, control: Attempt, device: str) -> None:
        lease = control.lease
        try:
            try:
                self._execute(job, control, device)
            except Cancelled:
                self._stopped(job, control)
            except LeaseLost:
                raise
            except Exception as exc:
                error = self._job_error(lease.job_id, exc)
                event = self._store.claims.finish_job(
                    lease, JobState.FAILED, time.time(), error=error, message=error.message
                )
                self._checkpoints.delete(lease.job_id)
                self._finished(job, event)
        except LeaseLost:
            logger.warning(
                "a write for the job was refused: its lease is gone and another replica owns the job; "
                "this attempt stopped without changing it",
                extra={"job_id": lease.job_id, "attempt": lease.attempt},
            )
            self._metrics.leases_lost.inc()
            self._checkpoints.discard(lease)

    def _stopped(self, job: Job, control: Attempt) -> None:
        """The engine stopped at a batch boundary: lease lost, cancelled, or the server is stopping."""
        lease = control.lease
        if control.lost.is_set():
            raise LeaseLost(lease)
        if control.cancel.is_set() or not control.stop.is_set():
            event = self._store.claims.finish_job(lease, JobState.CANCELLED, time.time(), message="cancelled")
            self._checkpoints.delete(lease.job_id)
        else:
            self._checkpoints.sync(lease)  # the engine flushed its last boundary when it stopped
            event = self._store.claims.release_job(
                lease,
                time.time(),
                message="the server is shutting down; the job resumes from its last checkpoint on the "
                "next replica that claims it",
            )
            if event.state is JobState.CANCELLED:
                self._checkpoints.delete(lease.job_id)
        self._finished(job, event)

    @staticmethod
    def _job_error(job_id: str, exc: Exception) -> JobError:
        error = service_error(exc)
        if isinstance(error, Internal):
            logger.error("job failed unexpectedly", exc_info=exc, extra={"job_id": job_id})
        else:
            logger.info("job failed: %s", error.message, extra={"job_id": job_id, "reason": error.reason})
        return JobError(code=int(error.code), message=error.message, reason=error.reason)

    def _progress_callback(self, lease: Lease, num_samples: int) -> Callable[[Progress], None]:
        last = [time.monotonic()]

        def on_progress(progress: Progress) -> None:
            now = time.monotonic()
            seconds, last[0] = now - last[0], now
            self._publish(self._store.claims.record_progress(lease, progress, time.time()))
            self._checkpoints.sync(lease)  # the engine checkpoints an epoch before reporting it
            self._metrics.count_epoch(progress, seconds, num_samples)

        return on_progress

    def _execute(self, job: Job, control: Attempt, device: str) -> None:
        lease, spec = control.lease, job.spec
        dataset = load_dataset(spec.dataset_uri, spec.dataset_format, self._storage, self._limits)
        self._metrics.dataset_bytes_read.labels(source=dataset.source).inc(dataset.bytes_read)
        if control.requested():
            raise Cancelled("stopped after loading")
        num_samples = len(dataset.labels)
        config = self._engine.resolve(spec.config, dataset, device)
        planned = run_info(
            config,
            device=device,
            num_samples=num_samples,
            num_classes=len(dataset.class_names),
            server_version=self._server_version,
        )
        self._store.claims.set_run_info(lease, planned, time.time())
        checkpoint = self._checkpoints.prepare(lease)
        weights = self._initial_weights(job, checkpoint.with_suffix(".init.pt"))
        try:
            report = self._engine.score(
                dataset,
                config,
                device=device,
                progress=self._progress_callback(lease, num_samples),
                should_cancel=control.requested,
                checkpoint_path=checkpoint,
                checkpoint_interval_seconds=self._settings.checkpoint_interval_seconds,
                initial_weights=weights,
            )
        finally:
            if weights is not None:
                weights.unlink(missing_ok=True)
        self._publish(
            self._store.claims.record_progress(lease, Progress(Stage.RANKING, fraction_done=1.0), time.time())
        )
        results = job_results(report, dataset, job_id=lease.job_id, server_version=self._server_version)
        event = self._store.claims.save_results(
            lease, results.scores, dataset.class_names, results.summary, results.run_info, time.time()
        )
        self._checkpoints.delete(lease.job_id)
        self._metrics.samples_scored.inc(num_samples)
        self._finished(job, event)

    def _initial_weights(self, job: Job, path: Path) -> Path | None:
        """Copy the job's initial weights to a local file the engine can torch.load."""
        uri = job.spec.initial_weights_uri
        if not uri:
            return None
        path.write_bytes(self._storage.read_bytes(uri, field="config.initial_weights_uri"))
        return path
