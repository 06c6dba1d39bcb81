"""`Client.watch` survives a dropped stream: the server is stopped mid-job and started again on
the same port and state folder, and the watch resumes after the last event it delivered; it gives
up, boundedly, when the server stays away."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import pytest

from o2u_client import Client, DeadlineExceededError, EventType, JobState, UnavailableError
from tests.server_testing import SLOW_CONFIG, TINY_CONFIG, RunningServer, running_server, test_settings

# Long enough that the restart happens while the job is still training.
RESTART_CONFIG = {**TINY_CONFIG, "pretrain_epochs": 30, "cycle_length_epochs": 3, "num_cycles": 3}


def test_watch_resumes_across_a_server_restart(
    data_root: Path, dataset_uri: str, tmp_path: Path, free_port: int
) -> None:
    # A fixed port: the client keeps its target while the server behind it restarts.
    settings = test_settings(
        state_dir=tmp_path / "state",
        data_roots=[data_root],
        listen_address=f"127.0.0.1:{free_port}",
        shutdown_grace_seconds=1.0,
    )
    with ExitStack() as stack, Client(f"127.0.0.1:{free_port}", timeout=30.0) as client:
        stack.enter_context(running_server(settings))
        job = client.submit(dataset_uri, config=RESTART_CONFIG)
        events = []
        restarted = False
        for event in client.watch(job.job_id):
            events.append(event)
            if not restarted and event.type == EventType.PROGRESS:
                restarted = True
                stack.close()  # drains: the open stream ends with UNAVAILABLE, the job is requeued
                stack.enter_context(running_server(settings))
        final = client.get(job.job_id)
    assert restarted
    sequences = [event.sequence for event in events]
    assert sequences == list(range(1, len(events) + 1)), "no event lost or repeated across the restart"
    states = [event.state for event in events if event.type == EventType.STATE_CHANGED]
    assert states.count(JobState.RUNNING) == 2, states  # one per attempt: the job did resume
    assert final.state == JobState.SUCCEEDED, final.error
    assert final.attempts == 2


def test_watch_gives_up_when_the_server_stays_down(
    start_server: Callable[..., RunningServer], dataset_uri: str
) -> None:
    with ExitStack() as stack:
        server = start_server(shutdown_grace_seconds=0.5)
        client = stack.enter_context(Client(server.address, timeout=1.0, watch_reconnects=2))
        job = client.submit(dataset_uri, config=SLOW_CONFIG)
        events = client.watch(job.job_id)
        next(events)
        server.run(server.server.stop)  # and never started again
        started = time.monotonic()
        with pytest.raises(UnavailableError, match="cannot reach the server"):
            for _ in events:
                pass
        assert time.monotonic() - started < 30


def test_watch_timeout_and_early_close(client: Client, dataset_uri: str) -> None:
    job = client.submit(dataset_uri, config=SLOW_CONFIG)
    try:
        with pytest.raises(DeadlineExceededError):
            client.wait(job.job_id, timeout=1.0)
        # Closing a watch early leaves the job running: closing a stream never cancels a job.
        events = client.watch(job.job_id)
        next(events)
        events.close()
        assert client.get(job.job_id).state in (JobState.QUEUED, JobState.RUNNING)
    finally:
        client.cancel(job.job_id)
    assert client.wait(job.job_id, timeout=60).state == JobState.CANCELLED


def test_concurrent_watchers_and_replay_of_a_finished_job(client: Client, dataset_uri: str) -> None:
    job = client.submit(dataset_uri, config=TINY_CONFIG)
    other: list[list[int]] = []

    def follow() -> None:
        with Client(client.target) as own:
            other.append([event.sequence for event in own.watch(job.job_id)])

    thread = threading.Thread(target=follow)
    thread.start()
    mine = [event.sequence for event in client.watch(job.job_id)]
    thread.join(timeout=120)
    assert other == [mine], "two watchers at once see the same ordered log"
    replay = list(client.watch(job.job_id))
    assert [event.sequence for event in replay] == mine
    assert list(client.watch(job.job_id, after_sequence=mine[-1])) == []
