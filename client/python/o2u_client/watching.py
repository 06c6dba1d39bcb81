"""Resumable event streams: the loop behind `Client.watch`.

A watch can outlive the connection it started on (a server restart, a pod rescheduled, a load
balancer idling the stream out, a network blip). Events carry a per-job sequence number and the
server replays from any `after_sequence`, so the loop reopens the stream after the last sequence it
delivered, drops anything at or below it, and stops at the event that makes the job final.

Reopening is bounded two ways. Until the server has answered the watch once, `max_reconnects`
attempts in a row without a new event are allowed, so a target that was never there (a mistyped
address) fails fast. Once it has answered (or the caller says it already did, e.g. a watch right
after the submit that created the job), the job goes on server-side (it is durable and resumes
after a restart), so the watch keeps trying with capped exponential backoff for `reconnect_window`
seconds from the moment it lost the server, and says so through `on_connection` when it loses the
server and when it has it back. A refusal that says when to come back (RESOURCE_EXHAUSTED with
RetryInfo: too many watch streams) is waited out like a broken stream. A watch's deadline bounds
every call it makes.
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

__all__ = ["ConnectionNotice", "WatchPolicy", "time_left", "watch_events"]

# Codes that mean "the stream broke", not "the request is wrong": worth reopening.
_RESUMABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED})

StreamOpener = Callable[[int, float | None], Iterable[scoring_pb2.WatchScoringJobResponse]]
# get_job(deadline): the job, by a call that ends by `deadline` (time.monotonic(); None: its own timeout).
JobGetter = Callable[[float | None], Job]
# Called with one line of text when the watch loses the server it had reached, and when it is back.
ConnectionNotice = Callable[[str], None]


@dataclass(frozen=True)
class WatchPolicy:
    max_reconnects: int = 5  # reopen attempts in a row without a new event, until the server first answers
    reconnect_window: float = 120.0  # seconds of reopen attempts once it has answered, from the loss on
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


def _earliest(*deadlines: float | None) -> float | None:
    given = [deadline for deadline in deadlines if deadline is not None]
    return min(given) if given else None


def _resumable(error: O2UError) -> bool:
    return error.code in _RESUMABLE or _busy(error)


def _busy(error: O2UError) -> bool:
    """A server that answered but asked to be called again later (RetryInfo)."""
    return error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.retry_delay is not None


class _Outage:
    """What the watch knows of its connection: whether the server has answered it yet, and the
    outage in progress (reopen attempts in a row without a new event, and since when)."""

    def __init__(self, policy: WatchPolicy, notify: ConnectionNotice | None, *, reached: bool) -> None:
        self._policy = policy
        self._notify = notify
        self.reached = reached  # the server has answered this watch (or the caller) at least once
        self.failures = 0  # reopen attempts in a row without a new event
        self._since: float | None = None  # time.monotonic() of the first of those failures
        self._told_lost = False

    def answered(self, last: int, *, progressed: bool) -> None:
        """The server answered (a probe, a stream's end or an event); `progressed`: a new event."""
        self.reached = True
        if self._told_lost:
            self._told_lost = False
            self._tell(f"reconnected to the server; the watch goes on after event {last}")
        if progressed:
            self.failures, self._since = 0, None

    def failed(self, error: O2UError) -> None:
        """A stream broke or ended early, or the server did not answer a probe."""
        self.failures += 1
        if self._since is None:
            self._since = time.monotonic()
        if self.reached and not self._told_lost and not _busy(error):
            self._told_lost = True
            self._tell(
                f"lost the connection to the server ({error}); "
                f"reconnecting for up to {self._policy.reconnect_window:g} s"
            )

    def give_up_at(self) -> float | None:
        """When reopening stops (time.monotonic()) once the server has answered; None before."""
        if not self.reached or self._since is None:
            return None
        return self._since + self._policy.reconnect_window

    def check(self, last_error: O2UError) -> None:
        """Raise `last_error` once the reopen attempts, or the window for them, are used up."""
        give_up_at = self.give_up_at()
        if give_up_at is None:
            if self.failures > self._policy.max_reconnects:
                raise last_error
        elif time.monotonic() >= give_up_at:
            raise last_error

    def _tell(self, line: str) -> None:
        if self._notify is not None:
            self._notify(line)


def _pause_and_probe(
    outage: _Outage,
    last: int,
    last_error: O2UError,
    policy: WatchPolicy,
    deadline: float | None,
    get_job: JobGetter,
) -> UnavailableError | None:
    """Wait before the next reopen attempt, then probe the server: None if it answers, else why not.

    Raises `last_error` once the reopen attempts (or their window) are used up, and
    DeadlineExceededError past `deadline`.
    """
    outage.check(last_error)
    give_up_at = outage.give_up_at()
    # A draining or busy server says when to come back (RetryInfo); otherwise exponential backoff.
    pause = policy.pause(outage.failures, last_error)
    stop = _earliest(deadline, give_up_at)
    time.sleep(pause if stop is None else max(0.0, min(pause, stop - time.monotonic())))
    time_left(deadline)
    outage.check(last_error)
    try:
        # A stream opened with wait_for_ready and no deadline would wait forever for a server that
        # never comes back; this unary call waits at most its own timeout, and never past `deadline`
        # nor past the end of the reconnect window.
        get_job(_earliest(deadline, give_up_at))
    except (UnavailableError, DeadlineExceededError) as unreachable:
        time_left(deadline)  # the watch's own deadline, not the server, ended the probe
        why = unreachable.message if isinstance(unreachable, UnavailableError) else "no answer in time"
        return UnavailableError(
            grpc.StatusCode.UNAVAILABLE,
            f"cannot reach the server to resume watching the job: {why}",
            retry_delay=unreachable.retry_delay,
        )
    outage.answered(last, progressed=False)
    return None


def watch_events(
    open_stream: StreamOpener,
    *,
    get_job: JobGetter,
    after_sequence: int = 0,
    timeout: float | None = None,
    policy: WatchPolicy = WatchPolicy(),
    on_connection: ConnectionNotice | None = None,
    server_reached: bool = False,
) -> Generator[Event, None, None]:
    """Yield events after `after_sequence` until the job is final, reopening broken streams.

    `open_stream(after_sequence, timeout)` starts one WatchScoringJob call. `get_job(deadline)` (a
    unary call with its own timeout and retries, ended by the watch's deadline) is the probe before
    each reopen: it waits, boundedly, for the server to come back, and tells whether a stream that
    ended without a final event did so because the job is already final. `on_connection` gets a
    line when the watch loses the server it had reached and when it has it back. `server_reached`:
    the caller has had an answer from this server already (it just created the job), so the
    reconnect window, not the count, applies from the start.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    last = after_sequence
    outage = _Outage(policy, on_connection, reached=server_reached)
    last_error: O2UError = UnavailableError(grpc.StatusCode.UNAVAILABLE, "watch stream closed")
    while True:
        if outage.failures:
            unreachable = _pause_and_probe(outage, last, last_error, policy, deadline, get_job)
            if unreachable is not None:
                last_error = unreachable
                outage.failed(unreachable)
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
                outage.answered(last, progressed=True)
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
            outage.answered(last, progressed=False)
            last_error = UnavailableError(
                grpc.StatusCode.UNAVAILABLE, "watch stream ended before the job finished"
            )
            if not received:
                try:
                    if get_job(deadline).done:
                        return
                except (UnavailableError, DeadlineExceededError) as unreachable:
                    time_left(deadline)
                    last_error = unreachable  # gone again: the probe before the reopen waits for it
        finally:
            cancel = getattr(stream, "cancel", None)
            if callable(cancel):
                cancel()  # an abandoned iterator must not keep the RPC open
        outage.failed(last_error)
