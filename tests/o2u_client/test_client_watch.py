"""`Client.watch` survives a dropped stream: the server is stopped mid-job and started again on
the same port and state folder, and the watch resumes after the last event it delivered; it gives
up, boundedly, when the server stays away, and never past its own timeout (nor does `wait`). A
server with no watch slot free says when to come back, and the watch waits that long. A connection
that goes silent without a reset (a TCP proxy that stops forwarding) is found dead by keepalive
pings, and the watch resumes on a new one."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import pytest

from o2u_client import Client, DeadlineExceededError, EventType, JobState, UnavailableError
from o2u_client.channel import KEEPALIVE_TIME, KEEPALIVE_TIMEOUT
from o2u_server.app import KEEPALIVE_TIMEOUT_MS, MIN_CLIENT_PING_INTERVAL_MS
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
    with Client(server.address) as holder, Client(server.address, interceptors=[streams]) as waiter:
        job = holder.submit(dataset_uri, config=SLOW_CONFIG)
        try:
            held = holder.watch(job.job_id)
            next(held)  # the server's only watch slot is taken
            # Refused with TOO_MANY_WATCH_STREAMS and a 10 s RetryInfo: waited out (until its
            # timeout here), not raised.
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


class _FreezingProxy:
    """A TCP proxy on loopback to `port` whose open connections `freeze()` makes silent both ways
    while their sockets stay open, as when a peer vanishes without a reset; new ones pass."""

    def __init__(self, port: int) -> None:
        self._upstream = port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.connections = 0
        self._frozen: set[int] = set()
        self._sockets: list[socket.socket] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept)]
        self._threads[0].start()

    def freeze(self) -> None:
        self._frozen.update(range(self.connections))

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                downstream, _ = self._listener.accept()
            except TimeoutError:
                continue
            upstream = socket.create_connection(("127.0.0.1", self._upstream))
            self._sockets += [downstream, upstream]
            number, self.connections = self.connections, self.connections + 1
            for source, sink in ((downstream, upstream), (upstream, downstream)):
                thread = threading.Thread(target=self._pump, args=(source, sink, number))
                self._threads.append(thread)
                thread.start()

    def _pump(self, source: socket.socket, sink: socket.socket, number: int) -> None:
        source.settimeout(0.1)
        while not self._stop.is_set():
            try:
                data = source.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            if number not in self._frozen:  # a frozen connection swallows what it gets
                try:
                    sink.sendall(data)
                except OSError:
                    return

    def __enter__(self) -> _FreezingProxy:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
        for sock in [self._listener, *self._sockets]:
            sock.close()


def test_keepalive_defaults_fit_what_the_server_allows() -> None:
    # Pinging more often than the server permits gets the connection closed (too_many_pings).
    assert KEEPALIVE_TIME * 1000 >= MIN_CLIENT_PING_INTERVAL_MS
    assert 0 < KEEPALIVE_TIMEOUT * 1000 <= KEEPALIVE_TIMEOUT_MS


def test_watch_resumes_after_its_connection_goes_silent(server: RunningServer, dataset_uri: str) -> None:
    # Pings every second here (the default is KEEPALIVE_TIME) so the dead connection shows quickly.
    with (
        _FreezingProxy(server.port) as proxy,
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
