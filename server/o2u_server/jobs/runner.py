"""The job runner: worker threads that take queued jobs and run them through the engine.

A job runs load -> resolve config -> train (the engine's stages, one PROGRESS event per epoch) ->
rank -> store, in a worker thread so training never blocks the event loop; every translation to and
from the engine is in `jobs.engine`. Loading reports LOADING progress (bytes and files read, at most
one event a second) and stops at the next chunk when the job is cancelled or the server stops.
Events reach watchers through `EventHub.publish_threadsafe` after the store has committed them.
Each job's failure is caught and recorded as that job's FAILED state, so it cannot take a worker or
another job down. Stopping the runner (server shutdown) asks running jobs to stop at the next batch
or chunk; they go back to QUEUED with their last epoch checkpoint and resume when the server starts
again. A cancelled job ends CANCELLED instead, and its checkpoint is deleted.

A resumed job must find the data it started with (`jobs.loading`: DATASET_CHANGED otherwise). On a
full state volume workers wait, progress events are skipped and state changes are retried until
they fit (`jobs.state_volume`), so the server recovers by itself once space is freed.
"""

from __future__ import annotations

import errno
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from o2u_server.datasets import DatasetLimits, LoadedDataset, load_dataset
from o2u_server.domain import Job, JobError, JobEvent, JobState, Progress, Stage
from o2u_server.errors import Internal, StateStoreFull
from o2u_server.jobs.engine import Cancelled, Engine, job_results, run_info, service_error
from o2u_server.jobs.events import EventHub
from o2u_server.jobs.loading import check_unchanged, loading_progress
from o2u_server.jobs.state_volume import StateVolume
from o2u_server.jobs.store import JobStore
from o2u_server.metrics import ServerMetrics
from o2u_server.settings import Settings
from o2u_server.storage import Stopped, Storage

__all__ = ["JobRunner"]

logger = logging.getLogger(__name__)


@dataclass
class _Control:
    """Flags a running job's worker polls between batches."""

    cancel: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)

    def requested(self) -> bool:
        return self.cancel.is_set() or self.stop.is_set()


class JobRunner:
    """A fixed pool of worker threads, one per device slot, fed from one FIFO queue of job ids."""

    def __init__(
        self,
        *,
        settings: Settings,
        store: JobStore,
        storage: Storage,
        metrics: ServerMetrics,
        hub: EventHub,
        devices: list[str],
        server_version: str,
        engine: Engine | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._storage = storage
        self._metrics = metrics
        self._hub = hub
        self._devices = devices
        self._server_version = server_version
        self._engine = engine or Engine()
        self._limits = DatasetLimits.from_settings(settings)
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._controls: dict[str, _Control] = {}
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._closing = threading.Event()
        self._volume = StateVolume(settings, self._closing)

    # -- lifecycle (called from the event loop) ---------------------------------------------------

    def start(self, job_ids: list[str]) -> None:
        """Start the workers with the jobs recovered from the store, oldest first."""
        for job_id in job_ids:
            self._queue.put(job_id)
        for index, device in enumerate(self._devices):
            thread = threading.Thread(
                target=self._work, args=(device,), name=f"o2u-worker-{index}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def submit(self, job_id: str) -> None:
        self._queue.put(job_id)

    def cancel(self, job_id: str) -> None:
        """Ask a running job to stop as CANCELLED (the store already holds the request)."""
        with self._lock:
            control = self._controls.get(job_id)
        if control is not None:
            control.cancel.set()

    def stop(self, timeout: float) -> bool:
        """Stop taking jobs, ask running ones to checkpoint and stop; True if all workers ended in time."""
        self._closing.set()
        with self._lock:
            for control in self._controls.values():
                control.stop.set()
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    # -- worker threads ---------------------------------------------------------------------------

    def _work(self, device: str) -> None:
        while True:
            job_id = self._queue.get()
            if job_id is None or self._closing.is_set():
                return
            try:
                self._run(job_id, device)
            except Exception:
                # Only bookkeeping failures (e.g. the store) get here; the worker must survive them.
                logger.exception("worker failed to run job", extra={"job_id": job_id})

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
        self._metrics.count_jobs(self._store.state_counts)
        self._publish(event)

    def _run(self, job_id: str, device: str) -> None:
        control = _Control()
        with self._lock:
            self._controls[job_id] = control  # before start_job, so a cancel can never miss it
            if self._closing.is_set():
                control.stop.set()  # stop() ran between our queue.get() and here
        try:
            self._volume.wait_for_space(job_id)
            started = self._volume.persist(lambda: self._store.start_job(job_id, time.time()))
            if started is None:
                return  # cancelled while it waited
            job, event = started
            self._finished(job, event)
            self._attempt(job, control, device)
        finally:
            with self._lock:
                del self._controls[job_id]

    def _record_progress(self, job_id: str, progress: Progress) -> None:
        """Store and publish a progress event; on a full state volume the event is skipped (the log
        stays gap-free: sequence numbers are given at commit)."""
        try:
            self._publish(self._store.record_progress(job_id, progress, time.time()))
        except StateStoreFull:
            logger.warning("skipped a progress event: the state volume is full", extra={"job_id": job_id})

    def _attempt(self, job: Job, control: _Control, device: str) -> None:
        job_id = job.job_id
        checkpoint = self._settings.checkpoint_dir / f"{job_id}.pt"
        try:
            self._execute(job, control, device, checkpoint)
        except (Cancelled, Stopped):
            if control.cancel.is_set() or not control.stop.is_set():
                event = self._volume.persist(
                    lambda: self._store.finish_job(
                        job_id, JobState.CANCELLED, time.time(), message="cancelled"
                    )
                )
                checkpoint.unlink(missing_ok=True)
                self._finished(job, event)
            else:
                message = (
                    "the server is shutting down; the job resumes from its last checkpoint on the next start"
                )
                event = self._volume.persist(
                    lambda: self._store.finish_job(job_id, JobState.QUEUED, time.time(), message=message)
                )
                self._finished(job, event)
            return
        except Exception as exc:
            error = self._job_error(job_id, exc)
            event = self._volume.persist(
                lambda: self._store.finish_job(
                    job_id, JobState.FAILED, time.time(), error=error, message=error.message
                )
            )
            checkpoint.unlink(missing_ok=True)
            self._finished(job, event)

    def _job_error(self, job_id: str, exc: Exception) -> JobError:
        error = service_error(exc)
        if isinstance(error, Internal):
            logger.error("job failed unexpectedly", exc_info=exc, extra={"job_id": job_id})
        else:
            logger.info("job failed: %s", error.message, extra={"job_id": job_id, "reason": error.reason})
        return JobError(code=int(error.code), message=self._scrub(error.message), reason=error.reason)

    def _scrub(self, message: str) -> str:
        """`message` without the state folder's path: callers never see where the server keeps files."""
        for path in sorted({str(self._settings.state_dir.resolve()), str(self._settings.state_dir)}, key=len)[
            ::-1
        ]:
            if path not in (".", "/"):
                message = message.replace(path, "<state_dir>")
        return message

    def _progress_callback(self, job_id: str, num_samples: int) -> Callable[[Progress], None]:
        last = [time.monotonic()]

        def on_progress(progress: Progress) -> None:
            now = time.monotonic()
            seconds, last[0] = now - last[0], now
            self._record_progress(job_id, progress)
            stage = progress.stage.value
            self._metrics.epoch_duration.labels(stage=stage).observe(seconds)
            # Stages 1 and 2 train on every sample; stage 3 on a split whose size only the engine
            # knows, estimated from its throughput.
            trained = (
                num_samples
                if progress.stage is not Stage.CLEAN_RETRAINING
                else progress.samples_per_second * seconds
            )
            self._metrics.training_samples.labels(stage=stage).inc(round(trained))
            self._metrics.samples_per_second.set(progress.samples_per_second)

        return on_progress

    def _load(self, job: Job, control: _Control) -> LoadedDataset:
        """The job's dataset, checked to be the one earlier attempts trained on."""
        spec = job.spec
        storage = self._storage.for_job(
            control.requested, loading_progress(lambda progress: self._record_progress(job.job_id, progress))
        )
        dataset = load_dataset(spec.dataset_uri, spec.dataset_format, storage, self._limits)
        self._metrics.dataset_bytes_read.labels(source=dataset.source).inc(dataset.bytes_read)
        loaded = Progress(
            Stage.LOADING, bytes_read=storage.reads.bytes_read, files_read=storage.reads.files_read
        )
        self._record_progress(job.job_id, loaded)
        if control.requested():
            raise Cancelled("stopped after loading")
        check_unchanged(job, dataset)
        return dataset

    def _execute(self, job: Job, control: _Control, device: str, checkpoint: Path) -> None:
        job_id, spec = job.job_id, job.spec
        dataset = self._load(job, control)
        num_samples = len(dataset.labels)
        config = self._engine.resolve(spec.config, dataset, device, uri=spec.dataset_uri)
        planned = run_info(
            config,
            device=device,
            num_samples=num_samples,
            num_classes=len(dataset.class_names),
            server_version=self._server_version,
            dataset_digest=dataset.digest,
        )
        self._volume.persist(lambda: self._store.set_run_info(job_id, planned, time.time()))
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        weights = self._initial_weights(job, checkpoint.with_suffix(".init.pt"))
        try:
            report = self._engine.score(
                dataset,
                config,
                device=device,
                progress=self._progress_callback(job_id, num_samples),
                should_cancel=control.requested,
                checkpoint_path=checkpoint,
                checkpoint_interval_seconds=self._settings.checkpoint_interval_seconds,
                initial_weights=weights,
            )
        finally:
            if weights is not None:
                weights.unlink(missing_ok=True)
        self._record_progress(job_id, Progress(Stage.RANKING, fraction_done=1.0))

        def save() -> JobEvent:
            # The score rows are a generator the store consumes, so a retried save builds them again.
            results = job_results(report, dataset, job_id=job_id, server_version=self._server_version)
            return self._store.save_results(
                job_id, results.scores, dataset.class_names, results.summary, results.run_info, time.time()
            )

        event = self._volume.persist(save)
        checkpoint.unlink(missing_ok=True)
        self._metrics.samples_scored.inc(num_samples)
        self._finished(job, event)

    def _initial_weights(self, job: Job, path: Path) -> Path | None:
        """Copy the job's initial weights to a local file the engine can torch.load."""
        uri = job.spec.initial_weights_uri
        if not uri:
            return None
        data = self._storage.read_bytes(uri, field="config.initial_weights_uri")
        try:
            path.write_bytes(data)
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StateStoreFull() from error
            raise
        return path
