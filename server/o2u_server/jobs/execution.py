"""One attempt of a claimed job, on the worker thread that claimed it: load -> check -> resolve config
-> train (the engine's stages, one PROGRESS event per epoch) -> rank -> store, and how it ends.

Every translation to and from the engine is in `jobs.engine`. Loading reports LOADING progress
(bytes and files read, at most one event a second: `jobs.loading`) and stops at the next chunk when
the job is cancelled, the server stops or the lease is lost; a resumed job must find the data it
started training on (DATASET_CHANGED otherwise), whichever replica ran the earlier attempt: the
digest travels in the job's run info, not in the checkpoint. Every write is fenced by the attempt's
lease: when one is refused (`LeaseLost`), or the lease keeper finds the lease gone, the attempt stops
without touching the job again, since another replica owns it now. A job's failure is recorded as
its FAILED state (the message never shows the server's own folders), so it cannot take a worker or
another job down. A stopped attempt is CANCELLED (a cancel) or released to the queue with its last
checkpoint (the server is stopping); one whose data-parallel worker or training process died goes
back to the queue the same way, counted as a crash of the attempt (`jobs.crashes`). On a full state volume or
database progress events are skipped and state changes wait for room (`jobs.state_volume`); events
reach watchers through `EventHub.publish_threadsafe` once the store has committed them.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from o2u_server.datasets import DatasetLimits, LoadedDataset, load_dataset
from o2u_server.domain import Job, JobError, JobEvent, JobState, Progress, Stage
from o2u_server.errors import Internal, ServiceError, StateStoreFull
from o2u_server.jobs.checkpoints import CheckpointStore
from o2u_server.jobs.engine import (
    Cancelled,
    Engine,
    SharedMemoryFull,
    WorkerFailed,
    check_epochs,
    job_results,
    run_info,
    service_error,
)
from o2u_server.jobs.events import EventHub
from o2u_server.jobs.leases import Attempt
from o2u_server.jobs.loading import check_unchanged, loading_progress
from o2u_server.jobs.state_volume import StateVolume
from o2u_server.jobs.store import JobStore, Lease, LeaseLost
from o2u_server.metrics import ServerMetrics
from o2u_server.settings import Settings
from o2u_server.storage import Stopped, Storage

__all__ = ["Execution"]

logger = logging.getLogger(__name__)
T = TypeVar("T")


class Execution:
    """Runs attempts of claimed jobs; thread-safe (each worker thread runs its own attempt)."""

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
        server_version: str,
        engine: Engine,
        closing: threading.Event,
    ) -> None:
        self._settings, self._store, self._claims = settings, store, store.claims
        self._storage, self._checkpoints, self._volume = storage, checkpoints, volume
        self._metrics, self._hub = metrics, hub
        self._server_version, self._engine, self._closing = server_version, engine, closing
        self._limits = DatasetLimits.from_settings(settings)
        folders = {settings.state_dir, checkpoints.directory}
        paths = {str(path) for folder in folders for path in (folder, folder.resolve())} - {".", "/"}
        self._private_paths = sorted(paths, key=len, reverse=True)  # longest first

    def publish(self, event: JobEvent | None) -> None:
        if event is not None:
            self._hub.publish_threadsafe(event)

    def finished(self, job: Job, event: JobEvent | None) -> None:
        """Account for a job's state change, then publish it: a watcher that sees the event and
        then scrapes /metrics must find the job counted."""
        if event is not None and event.terminal:
            self._metrics.jobs_finished.labels(state=event.state.value).inc()
            started = job.start_time if job.start_time is not None else job.create_time
            self._metrics.job_duration.labels(state=event.state.value).observe(
                max(0.0, event.event_time - started)
            )
        self._metrics.count_jobs(self._store.state_counts)
        self.publish(event)

    def _persist(self, write: Callable[[], T]) -> T:
        return self._volume.persist(write, self._closing)

    # -- how an attempt ends ----------------------------------------------------------------------

    def run(self, job: Job, control: Attempt, device: str) -> None:
        """Run the attempt `control` holds the lease of, to its end."""
        lease = control.lease
        try:
            try:
                self._execute(job, control, device)
            except (Cancelled, Stopped):
                self._stopped(job, control)
            except LeaseLost:
                raise
            except SharedMemoryFull as exc:  # no worker started: another try would fail the same way
                # torch's own words, for the operator; the caller's message says what to do
                logger.warning("%s", exc, extra={"job_id": lease.job_id})
                self._failed(job, control, exc)
            except WorkerFailed as failure:
                self._worker_failed(job, control, failure)
            except Exception as exc:
                self._failed(job, control, exc)
        except LeaseLost:
            logger.warning(
                "a write for the job was refused: its lease is gone and another replica owns the job; "
                "this attempt stopped without changing it",
                extra={"job_id": lease.job_id, "attempt": lease.attempt},
            )
            self._metrics.leases_lost.inc()
            try:
                resumes = self._store.is_open(lease.job_id)
            except ServiceError:  # the database is away: keep it (a start's sweep removes an ended job's)
                resumes = True
            self._checkpoints.discard(lease, resumes=resumes)

    def _failed(self, job: Job, control: Attempt, exc: Exception) -> None:
        lease = control.lease
        error = self._job_error(lease.job_id, exc)
        event = self._persist(
            lambda: self._claims.finish_job(
                lease, JobState.FAILED, time.time(), error=error, message=error.message
            )
        )
        self._checkpoints.delete(lease.job_id)
        self.finished(job, event)

    def _stopped(self, job: Job, control: Attempt) -> None:
        """The engine or a read stopped: lease lost, cancelled, or the server is stopping."""
        lease = control.lease
        if control.lost.is_set():
            raise LeaseLost(lease)
        if control.cancel.is_set() or not control.stop.is_set():
            event = self._persist(
                lambda: self._claims.finish_job(lease, JobState.CANCELLED, time.time(), message="cancelled")
            )
            self._checkpoints.delete(lease.job_id)
        else:
            self._checkpoints.sync(lease)  # the engine flushed its last boundary when it stopped
            event = self._persist(
                lambda: self._claims.release_job(
                    lease,
                    time.time(),
                    message="the server is shutting down; the job resumes from its last checkpoint on "
                    "the next replica that claims it",
                )
            )
            if event.state is JobState.CANCELLED:
                self._checkpoints.delete(lease.job_id)
        self.finished(job, event)

    def _worker_failed(self, job: Job, control: Attempt, failure: WorkerFailed) -> None:
        """A data-parallel worker or the training process died or timed out: requeue the job to
        resume from its checkpoint, unless such failures keep ending it at the same point
        (`jobs.crashes`)."""
        lease = control.lease
        if control.lost.is_set():
            raise LeaseLost(lease)
        cause = self._scrub(str(failure))
        logger.warning("a training worker failed: %s", cause, extra={"job_id": lease.job_id})
        self._metrics.training_failures.inc()
        self._checkpoints.sync(lease)  # worker 0 wrote it atomically at the last boundary
        event = self._persist(
            lambda: self._claims.retry_job(
                lease, time.time(), cause=cause, max_attempts=self._settings.max_job_attempts
            )
        )
        if event.state is not JobState.QUEUED:
            self._checkpoints.delete(lease.job_id)
        self.finished(job, event)

    def _job_error(self, job_id: str, exc: Exception) -> JobError:
        error = service_error(exc)
        if isinstance(error, Internal):
            logger.error("job failed unexpectedly", exc_info=exc, extra={"job_id": job_id})
        else:
            logger.info("job failed: %s", error.message, extra={"job_id": job_id, "reason": error.reason})
        return JobError(code=int(error.code), message=self._scrub(error.message), reason=error.reason)

    def _scrub(self, message: str) -> str:
        """`message` without the state and checkpoint folders' paths: callers never see where the
        server keeps its files."""
        for path in self._private_paths:
            message = message.replace(path, "<state_dir>")
        return message

    # -- progress ---------------------------------------------------------------------------------

    def _record_progress(self, lease: Lease, progress: Progress) -> None:
        """Store and publish a progress event; on a full state store the event is skipped (the log
        stays gap-free: sequence numbers are given at commit)."""
        try:
            self.publish(self._claims.record_progress(lease, progress, time.time()))
        except StateStoreFull as full:
            logger.warning("skipped a progress event: %s", full.message, extra={"job_id": lease.job_id})

    def _progress_callback(self, lease: Lease, num_samples: int) -> Callable[[Progress], None]:
        last = [time.monotonic()]

        def on_progress(progress: Progress) -> None:
            now = time.monotonic()
            seconds, last[0] = now - last[0], now
            self._record_progress(lease, progress)
            # Any checkpoint the engine wrote is on disk before the epoch is reported (with
            # checkpoint_interval_seconds it writes one only every so often); sync uploads a new one
            self._checkpoints.sync(lease)
            self._metrics.count_epoch(progress, seconds, num_samples)

        return on_progress

    # -- the attempt ------------------------------------------------------------------------------

    def _load(self, job: Job, control: Attempt) -> LoadedDataset:
        """The job's dataset, checked to be the one earlier attempts trained on."""
        spec, lease = job.spec, control.lease

        def on_loading(progress: Progress) -> None:
            try:
                self._record_progress(lease, progress)
            except LeaseLost:
                control.lost.set()  # the next chunk read stops the load (Stopped)

        storage = self._storage.for_job(control.requested, loading_progress(on_loading))
        dataset = load_dataset(
            spec.dataset_uri,
            spec.dataset_format,
            storage,
            self._limits,
            options=spec.dataset_options,
            allocate=self._engine.allocate,
        )
        self._metrics.dataset_bytes_read.labels(source=dataset.source).inc(dataset.bytes_read)
        reads = storage.reads
        self._record_progress(
            lease, Progress(Stage.LOADING, bytes_read=reads.bytes_read, files_read=reads.files_read)
        )
        if control.requested():
            raise Cancelled("stopped after loading")
        check_unchanged(job, dataset)
        return dataset

    def _execute(self, job: Job, control: Attempt, device: str) -> None:
        lease, spec = control.lease, job.spec
        dataset = self._load(job, control)
        num_samples = len(dataset.labels)
        config = self._engine.resolve(spec.config, dataset, device, uri=spec.dataset_uri)
        check_epochs(config, num_samples, self._settings.max_epochs_per_job)
        planned = run_info(
            config,
            device=device,
            num_samples=num_samples,
            num_classes=len(dataset.class_names),
            server_version=self._server_version,
            dataset_digest=dataset.digest,
            world_size=self._engine.world_size,
            skipped=dataset.skipped,
        )
        self._persist(lambda: self._claims.set_run_info(lease, planned, time.time()))
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
        self._record_progress(lease, Progress(Stage.RANKING, fraction_done=1.0))
        results = job_results(
            report,
            dataset,
            job_id=lease.job_id,
            server_version=self._server_version,
            world_size=self._engine.world_size,
        )
        event = self._persist(
            lambda: self._claims.save_results(  # the score rows are re-read on every try
                lease, results.scores, dataset.class_names, results.summary, results.run_info, time.time()
            )
        )
        self._checkpoints.delete(lease.job_id)
        self._metrics.samples_scored.inc(num_samples)
        self.finished(job, event)

    def _initial_weights(self, job: Job, path: Path) -> Path | None:
        """Copy the job's initial weights to a local file the engine can torch.load."""
        uri = job.spec.initial_weights_uri
        if not uri:
            return None
        data = self._storage.read_bytes(uri, field="config.initial_weights_uri")
        try:
            path.write_bytes(data)
        except OSError as error:
            path.unlink(missing_ok=True)
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StateStoreFull() from error
            raise
        return path
