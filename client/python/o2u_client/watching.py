"""Resumable event streams: the loop behind `Client.watch`.

A watch can outlive the connection it started on (a server restart, a load balancer idling the
stream out, a network blip). Events carry a per-job sequence number and the server replays
from any `after_sequence`, so the loop reopens the stream after the last sequence it delivered,
drops anything at or below it, and stops at the event that makes the job final. Reconnects are
bounded: after `max_reconnects` attempts in a row without a new event it gives up. A refusal that
says when to come back (RESOURCE_EXHAUSTED with RetryInfo: too many watch streams) is waited out
like a broken stream. A watch's deadline bounds every call it makes.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass

import grpc

from o2u.v1 import scoring_pb2
from o2u_client.errors import DeadlineExceededError, O2UError, UnavailableError, error_from_rpc
from o2u_client.models import Event, Job

__all__ = ["WatchPolicy", "time_left", "watch_events"]

# Codes that mean "the stream broke", not "the request is wrong": worth reopening.
_RESUMABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED})

StreamOpener = Callable[[int, float | None], Iterable[scoring_pb2.WatchScoringJobResponse]]
# get_job(deadline): the job, by a call that ends by `deadline` (time.monotonic(); None: its own timeout).
JobGetter = Callable[[float | None], Job]


@dataclass(frozen=True)
class WatchPolicy:
    max_reconnects: int = 5  # consecutive reopen attempts without a new event
    initial_backoff: float = 0.25  # seconds before the first reopen, doubled each time
    max_backoff: float = 8.0
    max_retry_delay: float = 30.0  # the longest RetryInfo delay honoured as given

    def pause(self, attempt: int, last_error: O2UError) -> float:
        """Seconds before reopen attempt `attempt`: the server's RetryInfo delay, else backoff."""
        if last_error.retry_delay:
            return min(last_error.retry_delay, self.max_retry_delay)
        return self.backoff(attempt)

    def backoff(self, attempt: int) -> float:
        return min(self.max_backoff, self.initial_backoff * 2.0 ** (attempt - 1)) * random.uniform(0.5, 1.0)


def time_left(deadline: float | None) -> float | None:
    """Seconds until `deadline` (time.monotonic()), None for none; DeadlineExceededError once past."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceededError(grpc.StatusCode.DEADLINE_EXCEEDED, "watch timed out")
    return left


def _resumable(error: O2UError) -> bool:
    return error.code in _RESUMABLE or (
        error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.retry_delay is not None
    )


def _pause_and_probe(
    failures: int,
    last_error: O2UError,
    policy: WatchPolicy,
    deadline: float | None,
    get_job: JobGetter,
) -> UnavailableError | None:
    """Wait before reopen attempt `failures`, then probe the server: None if it answers, else why not.

    Raises `last_error` once the reopen attempts are used up, and DeadlineExceededError past `deadline`.
    """
    if failures > policy.max_reconnects:
        raise last_error
    # A draining or busy server says when to come back (RetryInfo); otherwise exponential backoff.
    pause = policy.pause(failures, last_error)
    remaining = time_left(deadline)
    time.sleep(pause if remaining is None else min(pause, remaining))
    time_left(deadline)
    try:
        # A stream opened with wait_for_ready and no deadline would wait forever for a server that
        # never comes back; this unary call waits at most its own timeout, and never past `deadline`.
        get_job(deadline)
    except (UnavailableError, DeadlineExceededError) as unreachable:
        time_left(deadline)  # the watch's own deadline, not the server, ended the probe
        return UnavailableError(
            grpc.StatusCode.UNAVAILABLE,
            f"cannot reach the server to resume watching the job: {unreachable.message}",
            retry_delay=unreachable.retry_delay,
        )
    return None


def watch_events(
    open_stream: StreamOpener,
    *,
    get_job: JobGetter,
    after_sequence: int = 0,
    timeout: float | None = None,
    policy: WatchPolicy = WatchPolicy(),
) -> Generator[Event, None, None]:
    """Yield events after `after_sequence` until the job is final, reopening broken streams.

    `open_stream(after_sequence, timeout)` starts one WatchScoringJob call. `get_job(deadline)` (a
    unary call with its own timeout and retries, ended by the watch's deadline) is the probe before
    each reopen: it waits, boundedly, for the server to come back, and tells whether a stream that
    ended without a final event did so because the job is already final.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    last = after_sequence
    failures = 0  # consecutive reopen attempts without a new event
    last_error: O2UError = UnavailableError(grpc.StatusCode.UNAVAILABLE, "watch stream closed")
    while True:
        if failures:
            unreachable = _pause_and_probe(failures, last_error, policy, deadline, get_job)
            if unreachable is not None:
                last_error, failures = unreachable, failures + 1
                continue
        stream = open_stream(last, time_left(deadline))
        received = False
        try:
            for response in stream:
                event = Event.from_proto(response.event)
                if event.sequence <= last:
                    continue  # already delivered before the stream was reopened
                last = event.sequence
                received = True
                failures = 0
                yield event
                if event.state.is_terminal:
                    return
        except grpc.RpcError as rpc_error:
            broken = error_from_rpc(rpc_error)
            if not _resumable(broken):
                raise broken from None
            last_error = broken
        else:
            # The server ended the stream without a final event: it is draining, or there was
            # nothing after `last` because the job was already final.
            if not received and get_job(deadline).done:
                return
            last_error = UnavailableError(
                grpc.StatusCode.UNAVAILABLE, "watch stream ended before the job finished"
            )
        finally:
            cancel = getattr(stream, "cancel", None)
            if callable(cancel):
                cancel()  # an abandoned iterator must not keep the RPC open
        # Progress resets the count: only reopen attempts in a row without a new event are bounded.
        failures = 1 if received else failures + 1
