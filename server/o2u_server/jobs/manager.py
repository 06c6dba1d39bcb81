"""The job manager: the asynchronous API the servicer awaits, one method per RPC.

It validates requests, runs store calls on a small thread pool (SQLite is blocking; the event loop
must stay free for other calls and streams), hands new jobs to the runner and merges replayed and
live events for watchers. It speaks domain types only and raises `o2u_server.errors` exceptions,
which the interceptor maps to status codes.

Where a bad dataset shows up: CreateScoringJob checks the URI's form and permissions and that the
object exists (a single `stat`, or one listing page for an image folder), so a typo gets NOT_FOUND at
once; a dataset that disappears or turns out malformed after acceptance fails the job instead, with
the same code in `ScoringJob.error.code` (NOT_FOUND, INVALID_ARGUMENT, PERMISSION_DENIED, ...).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor
from contextlib import aclosing
from typing import Literal, TypeVar

from o2u_server import datasets
from o2u_server.domain import DatasetSummary, Job, JobEvent, JobSpec, JobState, ScoreFilter, ScorePage
from o2u_server.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from o2u_server.jobs.engine import engine_config
from o2u_server.jobs.events import EventHub, follow
from o2u_server.jobs.paging import PagePosition, PageTokens, resolve_page_size
from o2u_server.jobs.runner import JobRunner
from o2u_server.jobs.store import JobStore
from o2u_server.metrics import ServerMetrics
from o2u_server.settings import Settings
from o2u_server.storage import Storage

__all__ = ["EXPORT_COLUMNS", "JobManager", "new_job_id"]

T = TypeVar("T")
_JOB_ID = re.compile(r"job-[0-9a-f]{32}")
_REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
EXPORT_COLUMNS = (
    "rank",
    "sample_id",
    "key",
    "score",
    "score_variance",
    "noise_probability",
    "suspected",
    "given_label",
    "given_label_name",
    "suggested_label",
    "suggested_label_name",
    "suggested_label_confidence",
)


def new_job_id() -> str:
    return f"job-{uuid.uuid4().hex}"


def check_job_id(job_id: str) -> str:
    if not _JOB_ID.fullmatch(job_id):
        shown = job_id if len(job_id) <= 80 else job_id[:80] + "..."
        raise InvalidArgument(
            f"job_id {shown!r} is not a job id; job ids look like 'job-' followed by 32 hex digits",
            reason="INVALID_JOB_ID",
            field="job_id",
        )
    return job_id


class JobManager:
    """Jobs, their events and results, for the servicer."""

    def __init__(
        self,
        *,
        settings: Settings,
        store: JobStore,
        storage: Storage,
        runner: JobRunner,
        hub: EventHub,
        metrics: ServerMetrics,
        executor: Executor,
    ) -> None:
        self._settings = settings
        self._store = store
        self._storage = storage
        self._runner = runner
        self._hub = hub
        self._metrics = metrics
        self._executor = executor
        self._tokens: PageTokens | None = None
        self._phase: Literal["starting", "serving", "draining"] = "starting"
        self._watchers = 0

    async def _db(self, function: Callable[..., T], *args: object) -> T:
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
        if spec.request_id is not None and not _REQUEST_ID.fullmatch(spec.request_id):
            raise InvalidArgument(
                "request_id must be 1-64 characters of A-Z, a-z, 0-9, '-' or '_' (a UUID is recommended)",
                reason="INVALID_REQUEST_ID",
                field="request_id",
            )
        if len(spec.display_name) > 256:
            raise InvalidArgument("display_name is longer than 256 characters", field="display_name")
        engine_config(spec.config)  # INVALID_ARGUMENT naming the field, before anything is stored
        fmt = spec.dataset_format or datasets.infer_format(spec.dataset_uri)
        self._storage.parse(spec.dataset_uri, field="dataset.uri", allow_prefix=fmt == "image_folder")
        if spec.initial_weights_uri:
            self._storage.parse(spec.initial_weights_uri, field="config.initial_weights_uri")
        return await self._db(self._create, spec)

    def _create(self, spec: JobSpec) -> Job:
        earlier = self._store.job_for_request(spec)
        if earlier is not None:
            return earlier  # a retry: the dataset check already passed the first time
        self._check_dataset_exists(spec)
        job, created = self._store.create_job(
            new_job_id(), spec, time.time(), max_queued=self._settings.max_queued_jobs
        )
        if created:
            self._runner.submit(job.job_id)
            self._metrics.count_jobs(self._store.state_counts())
        return job

    def _check_dataset_exists(self, spec: JobSpec) -> None:
        if (spec.dataset_format or datasets.infer_format(spec.dataset_uri)) == "image_folder":
            objects = self._storage.iter_objects(spec.dataset_uri, field="dataset.uri")
            first = next(objects, None)
            getattr(objects, "close", lambda: None)()  # end the listing after its first entry
            if first is None:
                raise NotFound(
                    f"dataset.uri {spec.dataset_uri!r} names an image folder with no files in it",
                    reason="DATASET_NOT_FOUND",
                    field="dataset.uri",
                    resource_type="object",
                    resource_name=spec.dataset_uri,
                )
        else:
            self._storage.stat(spec.dataset_uri, field="dataset.uri")
        if spec.initial_weights_uri:
            self._storage.stat(spec.initial_weights_uri, field="config.initial_weights_uri")

    async def get(self, job_id: str) -> Job:
        self._ready()
        return await self._db(self._store.get_job, check_job_id(job_id))

    async def list_jobs(
        self, page_size: int, page_token: str, state: JobState | None
    ) -> tuple[list[Job], str]:
        tokens = self._ready()
        size = resolve_page_size(
            page_size, default=self._settings.default_page_size, maximum=self._settings.max_page_size
        )
        binding = PageTokens.binding("jobs", state=state.value if state else None)
        position = tokens.parse(page_token, binding)
        rows = await self._db(self._store.list_jobs, state, position.after if position else None, size + 1)
        next_token = ""
        if len(rows) > size:
            next_token = tokens.issue(binding, PagePosition(after=rows[size - 1][0], total=-1))
        return [job for _, job in rows[:size]], next_token

    async def cancel(self, job_id: str) -> Job:
        self._ready()
        job, event = await self._db(self._store.request_cancel, check_job_id(job_id), time.time())
        if event is not None:
            self._metrics.jobs_finished.labels(state=JobState.CANCELLED.value).inc()
            self._metrics.count_jobs(await self._db(self._store.state_counts))
            self._hub.publish(event)
        elif job.state is JobState.RUNNING:
            self._runner.cancel(job_id)
        return job

    async def delete(self, job_id: str) -> None:
        self._ready()
        await self._db(self._store.delete_job, check_job_id(job_id))
        for name in (f"{job_id}.pt", f"{job_id}.init.pt"):
            (self._settings.checkpoint_dir / name).unlink(missing_ok=True)

    # -- events --------------------------------------------------------------------------------

    async def watch(self, job_id: str, after_sequence: int) -> AsyncIterator[JobEvent]:
        """Events after `after_sequence`: replayed from the store, then live, until the final state."""
        self._ready()
        check_job_id(job_id)
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
            job, replay = await self._db(self._store.job_with_events, job_id, after_sequence)

            async def fetch(after: int, until: int) -> list[JobEvent]:
                return await self._db(self._store.events_after, job_id, after, until)

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
        job = await self._db(self._store.get_job, check_job_id(job_id))
        if job.state is not JobState.SUCCEEDED:
            detail = (
                "it has not finished yet; watch it or retry after it succeeds"
                if not job.finished
                else "it did not succeed, so it has no results"
            )
            raise FailedPrecondition(
                f"scoring job {job_id!r} is {job.state.value.upper()}: {detail}",
                reason="JOB_NOT_FINISHED" if not job.finished else "JOB_NOT_SUCCEEDED",
                resource_type="scoring_job",
                resource_name=job_id,
            )
        return job

    async def list_scores(
        self, job_id: str, page_size: int, page_token: str, filter: ScoreFilter
    ) -> ScorePage:
        tokens = self._ready()
        if filter.top_k < 0:
            raise InvalidArgument(
                "top_k must be >= 0 (0 means all samples)", reason="INVALID_FILTER", field="top_k"
            )
        if filter.min_score is not None and not math.isfinite(filter.min_score):
            raise InvalidArgument(
                "min_score must be a finite number", reason="INVALID_FILTER", field="min_score"
            )
        size = resolve_page_size(
            page_size, default=self._settings.default_page_size, maximum=self._settings.max_page_size
        )
        binding = PageTokens.binding("scores", job_id=job_id, **dataclasses.asdict(filter))
        position = tokens.parse(page_token, binding)
        await self._succeeded(job_id)
        total = position.total if position else await self._db(self._store.results.count, job_id, filter)
        after = position.after if position else 0
        rows = await self._db(self._store.results.page, job_id, filter, after, size + 1)
        next_token = ""
        if len(rows) > size:
            next_token = tokens.issue(binding, PagePosition(after=rows[size - 1].rank, total=total))
        return ScorePage(scores=rows[:size], next_page_token=next_token, total_size=total)

    async def summary(self, job_id: str) -> DatasetSummary:
        self._ready()
        await self._succeeded(job_id)
        return await self._db(self._store.results.summary, job_id)

    async def export(
        self, job_id: str, destination_uri: str, fmt: Literal["jsonl", "csv"] | None, only_suspected: bool
    ) -> tuple[int, int]:
        """Write the job's scores to `destination_uri`; returns (rows, bytes) written."""
        self._ready()
        check_job_id(job_id)
        self._storage.parse(destination_uri, field="destination_uri")
        if fmt is None:
            fmt = datasets.infer_export_format(destination_uri)
        await self._succeeded(job_id)
        return await self._db(
            self._export, job_id, destination_uri, fmt, ScoreFilter(only_suspected=only_suspected)
        )

    def _export(
        self, job_id: str, destination_uri: str, fmt: Literal["jsonl", "csv"], filter: ScoreFilter
    ) -> tuple[int, int]:
        rows: Iterator[dict[str, object]] = (
            {column: getattr(row, column) for column in EXPORT_COLUMNS}
            for row in self._store.results.iterate(job_id, filter)
        )
        return datasets.write_export(rows, destination_uri, fmt, self._storage, columns=EXPORT_COLUMNS)
