"""`Client.watch` survives a dropped stream: the server is stopped mid-job and started again on
the same port and state folder, and the watch resumes after the last event it delivered. Once the
server has answered, a reconnect window, not a count of attempts, bounds how long it keeps trying
(and it says when it lost the server and when it is back); a target never reached fails after the
count. It gives up, boundedly, when the server stays away, and never past its own timeout (nor does
`wait`). A server with no watch slot free says when to come back, and the watch waits that long. A
connection that goes silent without a reset (a TCP proxy that stops forwarding) is found dead by
keepalive pings, and the watch resumes on a new one."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc
import pytest

from o2u_client import Client, DeadlineExceededError, EventType, JobState, UnavailableError
from o2u_client.channel import KEEPALIVE_TIME, KEEPALIVE_TIMEOUT
from o2u_server.app import KEEPALIVE_TIMEOUT_MS, MIN_CLIENT_PING_INTERVAL_MS
from tests.o2u_client.loopback_proxy import LoopbackProxy
from tests.server_testing import SLOW_CONFIG, TINY_CONFIG, RunningServer, running_server, test_settings

# Long enough that the restart happens while the job is still training.
RESTART_CONFIG = {**TINY_CONFIG, "pretrain_epochs": 30, "cycle_length_epochs": 3, "num_cycles": 3}
# A well-formed job id that no server ever issued.
MISSING_JOB_ID = "job-" + "0" * 32


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
        # A window past the drained server's RetryInfo delay (5 s), so probes find nothing there.
        client = stack.enter_context(
            Client(server.address, timeout=1.0, watch_reconnects=2, watch_reconnect_window=8.0)
        )
        job = client.submit(dataset_uri, config=SLOW_CONFIG)
        events = client.watch(job.job_id)
        next(events)
        server.run(server.server.stop)  # and never started again
        started = time.monotonic()
        with pytest.raises(UnavailableError, match="cannot reach the server"):
            for _ in events:
                pass
        assert time.monotonic() - started < 30


def test_watch_rides_out_an_outage_longer_than_its_reconnect_count(
    data_root: Path, dataset_uri: str, tmp_path: Path, free_port: int
) -> None:
    settings = test_settings(
        state_dir=tmp_path / "state",
        data_roots=[data_root],
        listen_address=f"127.0.0.1:{free_port}",
        shutdown_grace_seconds=1.0,
    )
    notices: list[str] = []
    outage = 3.0  # seconds: one reopen attempt of fail-fast probes gives up well within it
    with (
        ExitStack() as servers,
        # Between client and server, so the watch sees connections refused (a pod rescheduled),
        # not the drain's "come back in 5 s", for as long as the server is away.
        LoopbackProxy(free_port) as proxy,
        Client(
            proxy.address,
            timeout=5.0,
            wait_for_ready=False,  # as the CLI: a probe fails at once while nothing listens
            watch_reconnects=1,
            watch_reconnect_window=60.0,
        ) as client,
    ):
        servers.enter_context(running_server(settings))
        job = client.submit(dataset_uri, config=RESTART_CONFIG)

        def restart_later() -> None:
            time.sleep(outage)
            servers.enter_context(running_server(settings))
            proxy.restore()

        restart = threading.Thread(target=restart_later)
        events = []
        for event in client.watch(job.job_id, timeout=120, on_connection=notices.append):
            events.append(event)
            if restart.ident is None and event.type == EventType.PROGRESS:
                proxy.refuse()
                servers.close()  # the job is requeued, to resume when the server is back
                restart.start()
        restart.join(timeout=60)
        final = client.get(job.job_id)
    assert [event.sequence for event in events] == list(range(1, len(events) + 1)), "none lost or repeated"
    assert final.state == JobState.SUCCEEDED, final.error
    assert final.attempts == 2, "the job went on on the server, across the restart"
    assert len(notices) == 2, notices
    assert notices[0].startswith("lost the connection to the server (UNAVAILABLE")
    assert "reconnecting for up to 60 s" in notices[0]
    assert notices[1].startswith("reconnected to the server; the watch goes on after event ")


def test_watch_of_a_target_never_reached_fails_after_its_reconnect_count(free_port: int) -> None:
    notices: list[str] = []
    target = f"127.0.0.1:{free_port}"  # nothing listens here: a mistyped address
    with Client(
        target, timeout=5.0, wait_for_ready=False, watch_reconnects=1, watch_reconnect_window=60.0
    ) as client:
        started = time.monotonic()
        with pytest.raises(UnavailableError, match="cannot reach the server"):
            list(client.watch(MISSING_JOB_ID, on_connection=notices.append))
        # The window is for a server that was there: this one never was, so the count decides.
        assert time.monotonic() - started < 20
    assert notices == [], "nothing was lost: it was never reached"


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


def test_watch_and_wait_end_by_their_timeout_while_the_server_is_away(
    start_server: Callable[..., RunningServer], dataset_uri: str
) -> None:
    server = start_server(shutdown_grace_seconds=0.5)
    # The library defaults: 30 s per call, waiting for the server to come back (wait_for_ready).
    with Client(server.address) as client:
        job = client.submit(dataset_uri, config=SLOW_CONFIG)
        events = client.watch(job.job_id, timeout=8.0)
        next(events)
        server.run(server.server.stop)  # the stream ends UNAVAILABLE (retry in 5 s); nothing answers after
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            for _ in events:
                pass
        # The probe before the reopen is cut at the watch's deadline, not after its own 30 s.
        assert time.monotonic() - started < 8.0 + 10
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            client.wait(job.job_id, timeout=2.0)
        assert time.monotonic() - started < 2.0 + 10


class _CountingStreams(grpc.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    """Counts the watch streams a client opens."""

    def __init__(self) -> None:
        self.opened = 0

    def intercept_unary_stream(
        self, continuation: Callable[[Any, Any], Any], client_call_details: Any, request: Any
    ) -> Any:
        self.opened += 1
        return continuation(client_call_details, request)


def test_watch_waits_out_a_server_without_a_free_watch_slot(
    start_server: Callable[..., RunningServer], dataset_uri: str
) -> None:
    server = start_server(max_watch_streams=1)
    streams = _CountingStreams()
    # The server's delay (10 s) capped at 3 s, so that the test waits less.
    waiting = Client(server.address, interceptors=[streams], max_retry_delay=3.0)
    with Client(server.address) as holder, waiting as waiter:
        job = holder.submit(dataset_uri, config=SLOW_CONFIG)
        try:
            held = holder.watch(job.job_id)
            next(held)  # the server's only watch slot is taken
            # Refused with TOO_MANY_WATCH_STREAMS and a RetryInfo: waited out (until its timeout
            # here), not raised.
            with pytest.raises(DeadlineExceededError):
                list(waiter.watch(job.job_id, timeout=2.0))
            assert streams.opened == 1
            events = waiter.watch(job.job_id)
            threading.Timer(1.0, held.close).start()  # frees the slot while the waiter waits
            first = next(events)
            # One refused stream, then the reopen after the server's delay: no reopen in between.
            assert streams.opened == 1 + 2
            assert first.sequence == 1
        finally:
            holder.cancel(job.job_id)
        assert [event.state for event in events][-1] == JobState.CANCELLED


def test_keepalive_defaults_fit_what_the_server_allows() -> None:
    # Pinging more often than the server permits gets the connection closed (too_many_pings).
    assert KEEPALIVE_TIME * 1000 >= MIN_CLIENT_PING_INTERVAL_MS
    assert 0 < KEEPALIVE_TIMEOUT * 1000 <= KEEPALIVE_TIMEOUT_MS


def test_watch_resumes_after_its_connection_goes_silent(server: RunningServer, dataset_uri: str) -> None:
    # Pings every second here (the default is KEEPALIVE_TIME) so the dead connection shows quickly.
    with (
        LoopbackProxy(server.port) as proxy,
        Client(proxy.address, timeout=20.0, keepalive_time=1.0, keepalive_timeout=1.0) as client,
    ):
        job = client.submit(dataset_uri, config=TINY_CONFIG)
        events = []
        for event in client.watch(job.job_id, timeout=120):
            events.append(event)
            if len(events) == 1:
                proxy.freeze()  # nothing more arrives on this connection, and nothing says so
        connections = proxy.connections
    assert connections >= 2, "the watch went on over a new connection"
    assert [event.sequence for event in events] == list(range(1, len(events) + 1))
    assert events[-1].state == JobState.SUCCEEDED
