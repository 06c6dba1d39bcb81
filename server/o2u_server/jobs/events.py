"""Live job events for WatchScoringJob streams, fanned out on the event loop.

Events are persisted by the store first; `publish` then hands each one to the queues of the streams
watching that job, and `follow` turns a replay from the store plus a live subscription into one
gap-free, duplicate-free stream. Worker threads publish through `publish_threadsafe`, which
schedules the fan-out on the loop, so queues are only touched by the loop thread. Queues are
unbounded: a job emits one event per epoch, so even a stalled reader holds little, and dropping
events would break the ordering guarantee the stream makes.

Events of jobs that run on another replica arrive as a `Committed` notice (from PostgreSQL's
NOTIFY, `jobs.notifications`): the job has stored events up to a sequence, which `follow` reads
from the store, the one source of truth. A notice can be lost (the listener's connection broke),
so `follow` also reads the store when nothing arrived for `poll_seconds`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass

from o2u_server.domain import JobEvent
from o2u_server.errors import Unavailable

__all__ = ["SHUTDOWN", "Committed", "EventHub", "Subscription", "follow"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Committed:
    """The store holds the job's events up to `sequence` (None: read whatever it holds)."""

    sequence: int | None


SHUTDOWN = None  # queued to every subscriber when the server shuts down
Subscription = asyncio.Queue[JobEvent | Committed | None]


class EventHub:
    """Subscriptions per job id; create it on the loop that serves the watch streams."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._subscribers: defaultdict[str, set[Subscription]] = defaultdict(set)
        self._closed = False

    def subscribe(self, job_id: str) -> Subscription:
        queue: Subscription = asyncio.Queue()
        if self._closed:
            queue.put_nowait(SHUTDOWN)
        self._subscribers[job_id].add(queue)
        return queue

    def unsubscribe(self, job_id: str, queue: Subscription) -> None:
        subscribers = self._subscribers.get(job_id)
        if subscribers is not None:
            subscribers.discard(queue)
            if not subscribers:
                del self._subscribers[job_id]

    def publish(self, event: JobEvent) -> None:
        """Deliver `event` to the job's watchers; call on the loop thread."""
        for queue in self._subscribers.get(event.job_id, ()):
            queue.put_nowait(event)

    def publish_threadsafe(self, event: JobEvent) -> None:
        """Deliver `event` from any thread (a no-op once the loop has closed)."""
        try:
            self._loop.call_soon_threadsafe(self.publish, event)
        except RuntimeError:
            logger.debug("event loop closed; dropped live event", extra={"job_id": event.job_id})

    def _notice(self, job_id: str | None, sequence: int | None) -> None:
        for key in (job_id,) if job_id is not None else tuple(self._subscribers):
            for queue in self._subscribers.get(key, ()):
                queue.put_nowait(Committed(sequence))

    def notify_threadsafe(self, job_id: str | None, sequence: int | None = None) -> None:
        """From any thread: `job_id` stored events up to `sequence` (None for every job: read the
        store, notices may have been missed)."""
        try:
            self._loop.call_soon_threadsafe(self._notice, job_id, sequence)
        except RuntimeError:
            logger.debug("event loop closed; dropped a notice", extra={"job_id": job_id})

    def close(self) -> None:
        """End every watch stream (they tell the caller to reconnect) and refuse new ones."""
        self._closed = True
        for subscribers in self._subscribers.values():
            for queue in subscribers:
                queue.put_nowait(SHUTDOWN)


async def follow(
    subscription: Subscription,
    replay: list[JobEvent],
    *,
    after_sequence: int,
    finished: bool,
    fetch: Callable[[int, int | None], Awaitable[list[JobEvent]]],
    poll_seconds: float = 5.0,
) -> AsyncGenerator[JobEvent, None]:
    """`replay` (the stored events after `after_sequence`), then live events, until a final state.

    The caller subscribes before reading `replay`, so an event committed in between arrives live
    (possibly twice: the sequence check drops the copy) instead of falling into a gap. A live event
    further ahead than the next sequence means publications crossed, and a `Committed` notice says
    the store has more; `fetch(after, until)` reads the missing ones from the store (all of them
    for `until=None`), as it does after `poll_seconds` of silence. `finished` says the job was final
    when `replay` was read.
    """
    last = after_sequence
    for event in replay:
        yield event
        last = event.sequence
        if event.terminal:
            return
    if finished:
        return  # the caller has already seen the final event
    while True:
        try:
            live = await asyncio.wait_for(subscription.get(), poll_seconds)
        except TimeoutError:
            live = Committed(None)
        if live is SHUTDOWN:
            raise Unavailable(
                f"the server is shutting down; watch again with after_sequence={last} to continue",
                reason="SERVER_SHUTTING_DOWN",
                retry_after_seconds=5,
            )
        if isinstance(live, Committed):
            if live.sequence is not None and live.sequence <= last:
                continue
            missed = await fetch(last, live.sequence)
        elif live.sequence <= last:
            continue
        else:
            missed = [live] if live.sequence == last + 1 else await fetch(last, live.sequence)
        for event in missed:
            yield event
            last = event.sequence
            if event.terminal:
                return
