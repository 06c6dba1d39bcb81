"""A server whose queue is full, for the tests of a submit that waits out QUEUE_FULL: one job
running, one queued, and a queue of one."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from o2u_client import Client, EventType, Job, JobState
from tests.server_testing import SLOW_CONFIG, RunningServer


class FreeTheQueueWhenFull(grpc.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    """Records the CreateScoringJob requests, and calls `free()` once the first is refused
    RESOURCE_EXHAUSTED: the queue has room by the time the client tries again."""

    def __init__(self, free: Callable[[], object]) -> None:
        self.free = free
        self.requests: list[Any] = []

    def intercept_unary_unary(
        self, continuation: Callable[[Any, Any], Any], client_call_details: Any, request: Any
    ) -> Any:
        outcome = continuation(client_call_details, request)
        if str(client_call_details.method).endswith("/CreateScoringJob"):
            self.requests.append(request)
            if len(self.requests) == 1 and outcome.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                self.free()
        return outcome


def started(client: Client, job: Job) -> None:
    """Return once the job is RUNNING: it no longer counts as queued."""
    for event in client.watch(job.job_id, timeout=60):
        if event.type == EventType.STATE_CHANGED and event.state == JobState.RUNNING:
            return
    raise AssertionError(f"job {job.job_id} ended without running")


@contextmanager
def full_queue(
    start_server: Callable[..., RunningServer], dataset_uri: str
) -> Iterator[tuple[RunningServer, Client, Job, Job]]:
    """(server, owner, running, queued): a server that runs one job at a time and queues one, with
    both taken by `owner`'s jobs, so the next submit is refused QUEUE_FULL."""
    server = start_server(max_queued_jobs=1, shutdown_grace_seconds=0.5)
    with Client(server.address, timeout=20.0) as owner:
        running = owner.submit(dataset_uri, config=SLOW_CONFIG)
        started(owner, running)
        queued = owner.submit(dataset_uri, config=SLOW_CONFIG)
        yield server, owner, running, queued
