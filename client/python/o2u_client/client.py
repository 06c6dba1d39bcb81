"""The synchronous Python client of the o2u ScoringService.

`Client` wraps one gRPC channel and speaks only the protocol in `o2u.v1`: every method converts
its arguments to a request, applies the unary timeout, retries UNAVAILABLE with backoff where the
call is safe to repeat (reads, cancel, export, and create thanks to its request_id, which also makes
a create whose answer came too late, DEADLINE_EXCEEDED, safe to repeat, and one refused by a full
queue that said when to come back, RESOURCE_EXHAUSTED with RetryInfo), and returns the frozen
dataclasses of `o2u_client.models` and `o2u_client.results`. List methods follow next_page_token
until the last page; `watch` resumes a dropped stream after the last sequence it delivered, and
it and `wait` bound every call they make by their own deadline.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from o2u.v1 import scoring_pb2, scoring_pb2_grpc
from o2u_client.channel import (
    KEEPALIVE_TIME,
    KEEPALIVE_TIMEOUT,
    Credential,
    TokenSource,
    check_token_transport,
    create_channel,
)
from o2u_client.converters import (
    build_config,
    build_dataset_options,
    dataset_format,
    export_format,
    job_state,
)
from o2u_client.errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    O2UError,
    ResourceExhaustedError,
    UnavailableError,
    error_from_rpc,
)
from o2u_client.models import Event, Job, JobState
from o2u_client.results import DatasetSummary, ExportResult, JobPage, NoiseScore, ScorePage
from o2u_client.watching import ConnectionNotice, WatchPolicy, time_left, watch_events

__all__ = ["Client"]

Request = TypeVar("Request")
Response = TypeVar("Response")


class Client:
    """A connection to an o2u server. Use as a context manager to close the channel."""

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        timeout: float = 30.0,
        tls: bool = False,
        root_certificates: Credential | None = None,
        client_cert: Credential | None = None,
        client_key: Credential | None = None,
        server_name: str | None = None,
        token: str | None = None,
        token_file: str | os.PathLike[str] | None = None,
        allow_plaintext_token: bool = False,
        wait_for_ready: bool = True,
        retries: int = 3,
        max_retry_delay: float = 30.0,
        watch_reconnects: int = 5,
        watch_reconnect_window: float = 120.0,
        keepalive_time: float | None = KEEPALIVE_TIME,
        keepalive_timeout: float = KEEPALIVE_TIMEOUT,
        interceptors: Sequence[
            grpc.UnaryUnaryClientInterceptor[Any, Any] | grpc.UnaryStreamClientInterceptor[Any, Any]
        ] = (),
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = target
        self.timeout = timeout  # seconds per unary call attempt
        self.wait_for_ready = wait_for_ready
        self.retries = retries  # extra attempts after UNAVAILABLE on calls safe to repeat
        if max_retry_delay < 0 or watch_reconnect_window < 0:
            raise ValueError(
                "max_retry_delay and watch_reconnect_window must be >= 0 seconds, got "
                f"{max_retry_delay} and {watch_reconnect_window}"
            )
        self.max_retry_delay = max_retry_delay  # the longest RetryInfo delay waited as the server asked
        self._tokens = TokenSource(token, token_file)
        self._tls = tls or root_certificates is not None or client_cert is not None
        check_token_transport(
            target, tls=self._tls, token_configured=self._tokens.configured, allowed=allow_plaintext_token
        )
        self._channel = create_channel(
            target,
            tls=tls,
            root_certificates=root_certificates,
            client_cert=client_cert,
            client_key=client_key,
            server_name=server_name,
            token_source=self._tokens,
            keepalive_time=keepalive_time,
            keepalive_timeout=keepalive_timeout,
            options=options,
        )
        channel = grpc.intercept_channel(self._channel, *interceptors) if interceptors else self._channel
        self._stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        self._health = health_pb2_grpc.HealthStub(channel)
        self._watch_policy = WatchPolicy(
            max_reconnects=watch_reconnects,
            reconnect_window=watch_reconnect_window,
            max_retry_delay=max_retry_delay,
        )

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- plumbing ----------------------------------------------------------------------------

    def _metadata(self) -> tuple[tuple[str, str], ...] | None:
        # Over TLS the call credentials attach the token; plain metadata is for insecure channels.
        if self._tls or not self._tokens.configured:
            return None
        return self._tokens.metadata()

    def _unary(
        self,
        method: grpc.UnaryUnaryMultiCallable[Request, Response],
        request: Request,
        *,
        idempotent: bool,
        retryable: Callable[[O2UError], bool] | None = None,
        deadline: float | None = None,
        after_retry: Callable[[O2UError], None] | None = None,
        before_retry: Callable[[O2UError, float, int], None] | None = None,
    ) -> Response:
        """One call, repeated when `idempotent` after the errors `retryable` accepts (by default
        UNAVAILABLE); `deadline` (time.monotonic()) bounds every attempt and pause.
        `after_retry` sees (and may amend) an error that ends a call that was retried;
        `before_retry(error, pause, attempt)` sees each error that is retried, before the pause,
        with the 1-based number of the attempt that failed."""
        attempt = 0
        while True:
            try:
                response: Response = method(
                    request,
                    timeout=self._attempt_timeout(deadline),
                    metadata=self._metadata(),
                    wait_for_ready=self.wait_for_ready,
                )
                return response
            except grpc.RpcError as rpc_error:
                error = error_from_rpc(rpc_error)
                repeatable = (
                    retryable(error) if retryable is not None else isinstance(error, UnavailableError)
                )
                pause = _backoff(attempt, error, self.max_retry_delay)
                if not (idempotent and repeatable and attempt < self.retries and _fits(pause, deadline)):
                    if attempt and after_retry is not None:
                        after_retry(error)
                    raise error from None
                if before_retry is not None:
                    before_retry(error, pause, attempt + 1)
            time.sleep(pause)
            attempt += 1

    def _attempt_timeout(self, deadline: float | None) -> float:
        if deadline is None:
            return self.timeout
        left = time_left(deadline)
        assert left is not None
        return min(self.timeout, left)

    # -- jobs --------------------------------------------------------------------------------

    def submit(
        self,
        uri: str,
        *,
        config: Mapping[str, Any] | scoring_pb2.ScoringConfig | None = None,
        format: str | None = None,
        request_id: str | None = None,
        display_name: str = "",
        webhook_url: str | None = None,
        dataset_options: Mapping[str, str | None] | scoring_pb2.DatasetOptions | None = None,
        on_retry: ConnectionNotice | None = None,
        **config_fields: Any,
    ) -> Job:
        """Create a scoring job for the dataset at `uri` (`s3://...` or `file:///...`).

        `config` and keyword arguments set ScoringConfig fields (e.g. `model="mlp", seed=1`).
        A fresh request_id (uuid4) is used unless given, so retries never create a second job: an
        attempt that fails UNAVAILABLE or DEADLINE_EXCEEDED is repeated with the same id, and so is
        one refused by a full queue (RESOURCE_EXHAUSTED with a retry delay: after that delay, at most
        `max_retry_delay`); RESOURCE_EXHAUSTED without one (a quota) fails at once. `on_retry` gets a
        line each time such a refusal is waited out (`the server's queue is full; retrying in 30 s
        (try 2 of 4)`); nothing is said otherwise. An error that ends the call carries the id as
        `request_id`, for the caller's own retry.
        `webhook_url` (an https URL on the server's allow-list) gets a signed event when the job ends.
        `dataset_options` say how the dataset is read: Parquet column names (`label_column`,
        `key_column`, `embedding_column`, `image_key_column`) or the Label Studio `annotation_rule`
        (`latest` or `majority`) and `image_field`; unset ones take the format's defaults.
        """
        request = scoring_pb2.CreateScoringJobRequest(
            dataset=scoring_pb2.DatasetRef(
                uri=uri,
                format=dataset_format(format),
                options=build_dataset_options(dataset_options),
            ),
            config=build_config(config, **config_fields),
            request_id=request_id or str(uuid.uuid4()),
            display_name=display_name,
            webhook=scoring_pb2.WebhookTarget(url=webhook_url) if webhook_url is not None else None,
        )
        try:
            response = self._unary(
                self._stub.CreateScoringJob,
                request,
                idempotent=True,
                retryable=_worth_resubmitting,
                before_retry=None if on_retry is None else _busy_notice(on_retry, self.retries + 1),
            )
        except O2UError as error:
            # The job may exist (an answer lost or late): the same id finds it instead of a second one.
            error.request_id = request.request_id
            raise
        return Job.from_proto(response.job)

    def get(self, job_id: str) -> Job:
        return self._get(job_id)

    def _get(self, job_id: str, deadline: float | None = None) -> Job:
        request = scoring_pb2.GetScoringJobRequest(job_id=job_id)
        response = self._unary(self._stub.GetScoringJob, request, idempotent=True, deadline=deadline)
        return Job.from_proto(response.job)

    def job_page(
        self,
        *,
        state: JobState | str | None = None,
        owner: str = "",
        page_size: int = 0,
        page_token: str = "",
    ) -> JobPage:
        """One page of jobs, newest first. `owner`: one principal's jobs, for an admin (any other
        caller lists only its own jobs, whatever it names)."""
        request = scoring_pb2.ListScoringJobsRequest(
            page_size=page_size, page_token=page_token, state=job_state(state), owner=owner
        )
        response = self._unary(self._stub.ListScoringJobs, request, idempotent=True)
        return JobPage([Job.from_proto(job) for job in response.jobs], response.next_page_token)

    def list(
        self, state: JobState | str | None = None, *, owner: str = "", page_size: int = 0
    ) -> Iterator[Job]:
        """Every job (optionally only those in `state`, or of `owner` for an admin), newest first,
        fetching pages lazily."""
        token = ""
        while True:
            page = self.job_page(state=state, owner=owner, page_size=page_size, page_token=token)
            yield from page.jobs
            token = page.next_page_token
            if not token:
                return

    def cancel(self, job_id: str) -> Job:
        """Stop a queued or running job; a no-op on a finished one."""
        request = scoring_pb2.CancelScoringJobRequest(job_id=job_id)
        return Job.from_proto(self._unary(self._stub.CancelScoringJob, request, idempotent=True).job)

    def delete(self, job_id: str) -> None:
        """Remove a finished job with its events and scores."""
        # Not retried: a repeat after a lost response would report NOT_FOUND for a job just deleted.
        request = scoring_pb2.DeleteScoringJobRequest(job_id=job_id)
        self._unary(self._stub.DeleteScoringJob, request, idempotent=False)

    # -- progress ----------------------------------------------------------------------------

    def watch(
        self,
        job_id: str,
        after_sequence: int = 0,
        *,
        timeout: float | None = None,
        on_connection: ConnectionNotice | None = None,
        server_reached: bool = False,
    ) -> Generator[Event, None, None]:
        """The job's events in order after `after_sequence`, until the one making it final.

        A dropped stream is reopened after the last sequence delivered, with capped exponential
        backoff, so no event is lost or repeated: until the server first answers, `watch_reconnects`
        times in a row; once it has, for `watch_reconnect_window` seconds from the loss on (a
        restart or a rescheduled pod), and `on_connection` gets a line when the server is lost and
        when it is back. `server_reached=True` says the caller has had an answer from this server
        already (the submit that created the job): the window then applies from the start, to an
        outage before the first event too. `timeout` bounds the whole watch, every call it makes
        included. Closing the iterator early never cancels the job.
        """

        def open_stream(after: int, remaining: float | None) -> Iterable[scoring_pb2.WatchScoringJobResponse]:
            request = scoring_pb2.WatchScoringJobRequest(job_id=job_id, after_sequence=after)
            return self._stub.WatchScoringJob(
                request, timeout=remaining, metadata=self._metadata(), wait_for_ready=self.wait_for_ready
            )

        return watch_events(
            open_stream,
            get_job=lambda deadline: self._get(job_id, deadline),
            after_sequence=after_sequence,
            timeout=timeout,
            policy=self._watch_policy,
            on_connection=on_connection,
            server_reached=server_reached,
        )

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Block until the job is final and return it; DeadlineExceededError after `timeout` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        job = self._get(job_id, deadline)
        if job.done:
            return job
        for _ in self.watch(job_id, timeout=time_left(deadline)):
            pass
        return self._get(job_id, deadline)

    # -- results -----------------------------------------------------------------------------

    def score_page(
        self,
        job_id: str,
        *,
        top_k: int = 0,
        min_score: float | None = None,
        only_suspected: bool = False,
        page_size: int = 0,
        page_token: str = "",
    ) -> ScorePage:
        """One page of a finished job's scores, most suspicious first."""
        request = scoring_pb2.ListNoiseScoresRequest(
            job_id=job_id,
            page_size=page_size,
            page_token=page_token,
            top_k=top_k,
            min_score=min_score,
            only_suspected=only_suspected,
        )
        response = self._unary(self._stub.ListNoiseScores, request, idempotent=True)
        scores = [NoiseScore.from_proto(score) for score in response.noise_scores]
        return ScorePage(scores, response.next_page_token, response.total_size)

    def scores(
        self,
        job_id: str,
        *,
        top_k: int = 0,
        min_score: float | None = None,
        only_suspected: bool = False,
        page_size: int = 0,
    ) -> Iterator[NoiseScore]:
        """Every matching score of a finished job, most suspicious first, fetching pages lazily."""
        token = ""
        while True:
            page = self.score_page(
                job_id,
                top_k=top_k,
                min_score=min_score,
                only_suspected=only_suspected,
                page_size=page_size,
                page_token=token,
            )
            yield from page.scores
            token = page.next_page_token
            if not token:
                return

    def summary(self, job_id: str) -> DatasetSummary:
        """Dataset health of a finished job: noise rates, per class, transition matrix."""
        request = scoring_pb2.GetDatasetSummaryRequest(job_id=job_id)
        return DatasetSummary.from_proto(
            self._unary(self._stub.GetDatasetSummary, request, idempotent=True).summary
        )

    def export(
        self, job_id: str, destination_uri: str, format: str | None = None, *, only_suspected: bool = False
    ) -> ExportResult:
        """Write the job's scores as JSONL, CSV or Parquet (format inferred from the extension if None)."""
        request = scoring_pb2.ExportNoiseScoresRequest(
            job_id=job_id,
            destination_uri=destination_uri,
            format=export_format(format),
            only_suspected=only_suspected,
        )
        # An export never replaces an object, so a repeat after an UNAVAILABLE that cut off the
        # response of an attempt that wrote it finds the destination taken: the error says so.
        response = self._unary(
            self._stub.ExportNoiseScores, request, idempotent=True, after_retry=_note_export_retried
        )
        return ExportResult(response.destination_uri, response.rows_written, response.bytes_written)

    # -- health ------------------------------------------------------------------------------

    def healthy(self, service: str = "", *, timeout: float | None = None) -> bool:
        """Whether the server's standard health service reports SERVING (False if unreachable)."""
        try:
            response = self._health.Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=self.timeout if timeout is None else timeout,
                metadata=self._metadata(),
            )
        except grpc.RpcError:
            return False
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


def _backoff(attempt: int, error: O2UError, max_retry_delay: float) -> float:
    """Seconds to wait before retry `attempt` (0-based): the server's RetryInfo (at most
    `max_retry_delay`), else jittered 2^n."""
    if error.retry_delay is not None:
        return min(error.retry_delay, max_retry_delay)
    return min(5.0, 0.2 * 2.0**attempt) * random.uniform(0.5, 1.0)


def _worth_resubmitting(error: O2UError) -> bool:
    """Whether a create is repeated with its request_id: after UNAVAILABLE, after DEADLINE_EXCEEDED
    (the job may exist, its answer came too late), and after RESOURCE_EXHAUSTED that says when to
    come back (a full queue); without a retry delay (a quota) the same request fails again."""
    if isinstance(error, ResourceExhaustedError):
        return error.retry_delay is not None
    return isinstance(error, UnavailableError | DeadlineExceededError)


def _busy_notice(notify: ConnectionNotice, tries: int) -> Callable[[O2UError, float, int], None]:
    """A `before_retry` that tells `notify` when a create waits out a server that asked it to come
    back later (RESOURCE_EXHAUSTED with RetryInfo: a full queue); other retries are quick and quiet."""

    def before_retry(error: O2UError, pause: float, failed: int) -> None:
        if not isinstance(error, ResourceExhaustedError) or error.retry_delay is None:
            return
        why = (
            "the server's queue is full" if error.reason == "QUEUE_FULL" else f"the server is busy ({error})"
        )
        notify(f"{why}; retrying in {round(pause, 1):g} s (try {failed + 1} of {tries})")

    return before_retry


def _fits(pause: float, deadline: float | None) -> bool:
    """Whether a pause of `pause` s still leaves time for another attempt before `deadline`."""
    return deadline is None or time.monotonic() + pause < deadline


def _note_export_retried(error: O2UError) -> None:
    """A retried export that finds its destination taken may have been the writer itself."""
    if isinstance(error, AlreadyExistsError):
        error.message += (
            " (this export was retried after UNAVAILABLE, so an attempt whose response was lost may"
            " have written it: check the object, or export to a new name)"
        )
        error.args = (error.message,)
