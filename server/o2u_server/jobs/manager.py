"""The job manager: the asynchronous API the servicer awaits, one method per RPC.

It validates requests, runs store calls on a small thread pool (the database driver is blocking;
the event loop must stay free for other calls and streams), wakes the runner for new jobs and
merges replayed and live events for watchers. Every method answers from the shared store, so any
replica answers for any job, wherever it runs. It speaks domain types only and raises
`o2u_server.errors` exceptions, which the interceptor maps to status codes.

New work needs room on this replica's state volume (`jobs.state_volume`): below
`min_free_state_bytes` free, CreateScoringJob is RESOURCE_EXHAUSTED (STATE_DISK_FULL) while every
read keeps working, until space is freed (another replica with room may accept the job meanwhile).

Where a bad dataset shows up: CreateScoringJob checks the URI's form and permissions and that the
object exists (`datasets.check_dataset_exists`: one `stat`, or one listing page for a folder), so a
typo gets NOT_FOUND at once; a dataset that disappears or turns out malformed after acceptance fails
the job instead, with the same code in `ScoringJob.error.code` (NOT_FOUND, INVALID_ARGUMENT, ...).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor
from contextlib import aclosing
from typing import Literal, TypeVar

from o2u_server.datasets import check_dataset_exists
from o2u_server.datasets.exports import EXPORT_COLUMNS, infer_export_format, write_export
from o2u_server.domain import (
    DatasetSummary,
    ExportFormat,
    Job,
    JobEvent,
    JobSpec,
    JobState,
    NoiseScoreRow,
    ScoreFilter,
    ScorePage,
)
from o2u_server.errors import (
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    StateStoreFull,
    Unavailable,
)
from o2u_server.jobs.checkpoints import CheckpointStore
from o2u_server.jobs.events import EventHub, follow
from o2u_server.jobs.owners import listing_owner, visible
from o2u_server.jobs.paging import PagePosition, PageTokens, resolve_page_size
from o2u_server.jobs.requests import check_job_id, check_job_spec, check_score_filter, new_job_id
from o2u_server.jobs.runner import JobRunner
from o2u_server.jobs.state_volume import StateVolume
from o2u_server.jobs.store import JobStore
from o2u_server.jobs.webhooks import check_webhook_url
from o2u_server.metrics import ServerMetrics
from o2u_server.principals import current_principal
from o2u_server.settings import Settings
from o2u_server.storage import Storage

__all__ = ["JobManager"]

T = TypeVar("T")


class JobManager:
    """Jobs, their events and results, for the servicer."""

    def __init__(
        self,
        *,
        settings: Settings,
        store: JobStore,
        storage: Storage,
        checkpoints: CheckpointStore,
        volume: StateVolume,
        runner: JobRunner,
        hub: EventHub,
        metrics: ServerMetrics,
        executor: Executor,
    ) -> None:
        self._settings = settings
        self._store = store
        self._storage = storage
        self._checkpoints = checkpoints
        self._volume = volume
        self._runner = runner
        self._hub = hub
        self._metrics = metrics
        self._executor = executor
        self._tokens: PageTokens | None = None
        self._phase: Literal["starting", "serving", "draining"] = "starting"
        self._watchers = 0

    async def _blocking(self, function: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, functools.partial(function, *args)
        )

    # -- lifecycle -----------------------------------------------------------------------------

    def serve(self, tokens: PageTokens) -> None:
        self._tokens = tokens
        self._phase = "serving"

    def drain(self) -> None:
        """Refuse new jobs and end watch streams (callers reconnect elsewhere or after the restart)."""
        self._phase = "draining"
        self._hub.close()

    def _ready(self) -> PageTokens:
        if self._phase == "starting" or self._tokens is None:
            raise Unavailable(
                "the server is starting; retry shortly", reason="SERVER_STARTING", retry_after_seconds=1
            )
        return self._tokens

    # -- jobs ----------------------------------------------------------------------------------

    async def create(self, spec: JobSpec) -> Job:
        self._ready()
        if self._phase == "draining":
            raise Unavailable(
                "the server is shutting down and accepts no new jobs; retry on another replica or after "
                "the restart",
                reason="SERVER_SHUTTING_DOWN",
                retry_after_seconds=5,
            )
        check_job_spec(spec, self._storage, max_epochs=self._settings.max_epochs_per_job)
        if spec.webhook_url is not None:
            check_webhook_url(spec.webhook_url, self._settings)
        return await self._blocking(self._create, dataclasses.replace(spec, owner=current_principal().name))

    def _create(self, spec: JobSpec) -> Job:
        earlier = self._store.job_for_request(spec)
        if earlier is not None:
            return earlier  # a retry: the dataset check already passed the first time
        if not self._volume.has_room():
            raise StateStoreFull()  # reads keep working; new work waits until space is freed
        check_dataset_exists(spec.dataset_uri, spec.dataset_format, self._storage)
        if spec.initial_weights_uri:
            self._storage.stat(spec.initial_weights_uri, field="config.initial_weights_uri")
        job, created = self._store.create_job(
            new_job_id(),
            spec,
            time.time(),
            max_queued=self._settings.max_queued_jobs,
            max_per_owner=self._settings.max_jobs_per_principal,
        )
        if created:
            self._runner.submit(job.job_id)
            self._metrics.count_jobs(self._store.state_counts)
        return job

    async def get(self, job_id: str) -> Job:
        self._ready()
        return await self._owned(job_id)

    async def _owned(self, job_id: str) -> Job:
        """The job, if the calling principal may see it; NotFound, as for a missing id, if not."""
        job = await self._blocking(self._store.get_job, check_job_id(job_id))
        return visible(job, current_principal())

    async def list_jobs(
        self, page_size: int, page_token: str, state: JobState | None, owner: str = ""
    ) -> tuple[list[Job], str]:
        tokens = self._ready()
        owner_filter = listing_owner(current_principal(), owner)
        size = resolve_page_size(
            page_size, default=self._settings.default_page_size, maximum=self._settings.max_page_size
        )
        binding = PageTokens.binding("jobs", state=state.value if state else None, owner=owner_filter)
        position = tokens.parse(page_token, binding)
        rows = await self._blocking(
            self._store.list_jobs, state, position.after if position else None, size + 1, owner_filter
        )
        next_token = ""
        if len(rows) > size:
            next_token = tokens.issue(binding, PagePosition(after=rows[size - 1][0], total=-1))
        return [job for _, job in rows[:size]], next_token

    async def cancel(self, job_id: str) -> Job:
        self._ready()
        await self._owned(job_id)
        job, event = await self._blocking(self._store.request_cancel, check_job_id(job_id), time.time())
        if event is not None:
            self._metrics.jobs_finished.labels(state=JobState.CANCELLED.value).inc()
            await self._blocking(self._metrics.count_jobs, self._store.state_counts)
            self._hub.publish(event)
        elif job.state is JobState.RUNNING:
            self._runner.cancel(job_id)
        return job

    async def delete(self, job_id: str) -> None:
        self._ready()
        await self._owned(job_id)
        await self._blocking(self._store.delete_job, check_job_id(job_id))
        await self._blocking(self._checkpoints.delete, job_id)

    # -- events --------------------------------------------------------------------------------

    async def watch(self, job_id: str, after_sequence: int) -> AsyncIterator[JobEvent]:
        """Events after `after_sequence`: replayed from the store, then live, until the final state."""
        self._ready()
        check_job_id(job_id)
        caller = current_principal()
        if after_sequence < 0:
            raise InvalidArgument(
                "after_sequence must be >= 0", reason="INVALID_SEQUENCE", field="after_sequence"
            )
        if self._watchers >= self._settings.max_watch_streams:
            raise ResourceExhausted(
                f"too many open watch streams (limit {self._settings.max_watch_streams}); retry later or "
                "poll GetScoringJob",
                reason="TOO_MANY_WATCH_STREAMS",
                retry_after_seconds=10,
            )
        subscription = self._hub.subscribe(job_id)
        self._watchers += 1
        self._metrics.watch_streams.inc()
        try:
            job, replay = await self._blocking(self._store.job_with_events, job_id, after_sequence)
            visible(job, caller)

            async def fetch(after: int, until: int | None) -> list[JobEvent]:
                missed = await self._blocking(self._store.events.after, job_id, after, until)
                if not missed and until is None:
                    # A poll that found nothing: the job may have been deleted before this watch saw
                    # its final event (a notice from another replica lost), and would wait forever.
                    await self._owned(job_id)  # NotFound then
                return missed

            events = follow(
                subscription, replay, after_sequence=after_sequence, finished=job.finished, fetch=fetch
            )
            async with aclosing(events):
                async for event in events:
                    yield event
        finally:
            self._hub.unsubscribe(job_id, subscription)
            self._watchers -= 1
            self._metrics.watch_streams.dec()

    # -- results -------------------------------------------------------------------------------

    async def _succeeded(self, job_id: str) -> Job:
        return _require_succeeded(await self._owned(job_id))

    async def list_scores(
        self, job_id: str, page_size: int, page_token: str, score_filter: ScoreFilter
    ) -> ScorePage:
        tokens = self._ready()
        check_score_filter(score_filter)
        size = resolve_page_size(
            page_size, default=self._settings.default_page_size, maximum=self._settings.max_page_size
        )
        binding = PageTokens.binding("scores", job_id=job_id, **dataclasses.asdict(score_filter))
        position = tokens.parse(page_token, binding)
        check_job_id(job_id)
        caller = current_principal()

        def read() -> tuple[int, list[NoiseScoreRow]]:
            """The page in one trip to the worker threads: the job's check, the total, the rows."""
            _require_succeeded(visible(self._store.get_job(job_id), caller))
            results = self._store.results
            total = position.total if position else results.count(job_id, score_filter)
            return total, results.page(job_id, score_filter, position.after if position else 0, size + 1)

        total, rows = await self._blocking(read)
        next_token = ""
        if len(rows) > size:
            next_token = tokens.issue(binding, PagePosition(after=rows[size - 1].rank, total=total))
        return ScorePage(scores=rows[:size], next_page_token=next_token, total_size=total)

    async def summary(self, job_id: str) -> DatasetSummary:
        self._ready()
        await self._succeeded(job_id)
        return await self._blocking(self._store.results.summary, job_id)

    async def export(
        self, job_id: str, destination_uri: str, export_format: ExportFormat | None, only_suspected: bool
    ) -> tuple[int, int]:
        """Write the job's scores to `destination_uri`; returns (rows, bytes) written."""
        self._ready()
        check_job_id(job_id)
        self._storage.parse_export(destination_uri, field="destination_uri")
        if export_format is None:
            export_format = infer_export_format(destination_uri)
        job = await self._succeeded(job_id)
        # Label Studio tasks are the suspects only: the other rows need not be read at all.
        only_suspected = only_suspected or export_format is ExportFormat.LABEL_STUDIO
        return await self._blocking(
            self._export, job, destination_uri, export_format, ScoreFilter(only_suspected=only_suspected)
        )

    def _export(
        self, job: Job, destination_uri: str, export_format: ExportFormat, score_filter: ScoreFilter
    ) -> tuple[int, int]:
        rows: Iterator[dict[str, object]] = (
            {column: getattr(row, column) for column in EXPORT_COLUMNS}
            for row in self._store.results.iterate(job.job_id, score_filter)
        )
        return write_export(
            rows, destination_uri, export_format, self._storage, columns=EXPORT_COLUMNS, job=job
        )


def _require_succeeded(job: Job) -> Job:
    """`job` if it succeeded; FailedPrecondition, saying why it has no results yet, if not."""
    if job.state is not JobState.SUCCEEDED:
        detail = (
            "it has not finished yet; watch it or retry after it succeeds"
            if not job.finished
            else "it did not succeed, so it has no results"
        )
        raise FailedPrecondition(
            f"scoring job {job.job_id!r} is {job.state.value.upper()}: {detail}",
            reason="JOB_NOT_FINISHED" if not job.finished else "JOB_NOT_SUCCEEDED",
            resource_type="scoring_job",
            resource_name=job.job_id,
        )
    return job
