"""A real o2u server for tests, in-process, plus small labelled datasets to score.

Usage::

    from tests.server_testing import running_server, test_settings, write_noisy_digits

    flipped = write_noisy_digits(data_root / "digits.npz")
    settings = test_settings(state_dir=tmp_path / "state", data_roots=[data_root])
    with running_server(settings) as server:
        channel = server.channel()                     # grpc.Channel to server.address
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        text = server.scrape()                         # GET server.metrics_url
    # leaving the block drains and stops the server (state stays in settings.state_dir)

`running_server(settings, engine=None, stop_grace=None)` starts `o2u_server.app.create_server(settings)`
on its own event loop in a background thread and yields a `RunningServer` with `address`
("127.0.0.1:PORT"), `port`, `metrics_port`, `metrics_url`, `settings`, the `O2UServer` itself as
`server`, `channel()`, `scrape()` and `run(coroutine_function)` (run a coroutine on the server's loop,
e.g. `server.run(server.server.drain)`). `test_settings(...)` gives settings bound to loopback with
free ports, CPU training and a short shutdown grace; keyword overrides go to Settings. Entering the
context again with the same settings restarts the server on the same state. `TINY_CONFIG` trains in
about a second on two cores; `SLOW_CONFIG` runs until cancelled (minutes).
`assert_requeued_and_resumed(events, cause)` checks the events of a job whose training died once
and resumed from its checkpoint.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from o2u.v1 import scoring_pb2 as pb
from o2u.v1 import scoring_pb2_grpc
from o2u_server.app import O2UServer, create_server
from o2u_server.jobs.engine import Engine
from o2u_server.settings import Settings
from tests.server_process import unlabelled_gauge

__all__ = [
    "DIGITS_SAMPLES",
    "SLOW_CONFIG",
    "TINY_CONFIG",
    "ErrorDetails",
    "RunningServer",
    "call_error",
    "child_pids",
    "create_job",
    "error_details",
    "rpc_error",
    "running_server",
    "sqlite_integrity",
    "test_settings",
    "wait_for_job",
    "write_noisy_blobs",
    "write_noisy_digits",
]

T = TypeVar("T")

DIGITS_SAMPLES = 400  # default size of write_noisy_digits' dataset
# ScoringConfig fields (by proto name) of a job that finishes in about a second.
TINY_CONFIG: dict[str, Any] = {
    "model": "mlp",
    "seed": 0,
    "pretrain_epochs": 2,
    "cycle_length_epochs": 2,
    "num_cycles": 1,
    "pretrain_batch_size": 64,
    "cyclic_batch_size": 32,
}
# A job that keeps training (thousands of epochs) until it is cancelled or the server stops.
SLOW_CONFIG: dict[str, Any] = {**TINY_CONFIG, "pretrain_epochs": 10_000, "pretrain_batch_size": 8}


def test_settings(*, state_dir: Path, data_roots: list[Path], **overrides: Any) -> Settings:
    """Settings for a loopback test server with free gRPC and metrics ports."""
    values: dict[str, Any] = {
        "listen_address": "127.0.0.1:0",
        "metrics_address": "127.0.0.1",
        "metrics_port": 0,
        "state_dir": state_dir,
        "data_roots": data_roots,
        "device": "cpu",
        "max_concurrent_jobs": 1,
        "shutdown_grace_seconds": 5.0,
        **overrides,
    }
    return Settings(**values)


test_settings.__test__ = False  # type: ignore[attr-defined]  # not a test, despite the name


@dataclass
class RunningServer:
    """A started server; see the module docstring."""

    server: O2UServer
    settings: Settings
    port: int
    metrics_port: int
    loop: asyncio.AbstractEventLoop

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address)

    def scrape(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            text: str = response.read().decode()
        return text

    def gauge(self, name: str) -> float:
        """The value of the unlabelled metric `name` in its /metrics."""
        return unlabelled_gauge(self.scrape(), name)

    def run(self, function: Callable[[], Awaitable[T]], timeout: float = 60.0) -> T:
        async def call() -> T:
            return await function()

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(timeout)


@contextmanager
def running_server(
    settings: Settings, *, engine: Engine | None = None, stop_grace: float | None = None
) -> Iterator[RunningServer]:
    """Start a server on a background event loop; drain and stop it when the block ends."""
    started: Future[RunningServer] = Future()
    stop_requested: list[asyncio.Event] = []

    async def serve() -> None:
        server = create_server(settings, engine=engine)
        try:
            port = await server.start()
        except BaseException as exc:
            started.set_exception(exc)
            return
        stop = asyncio.Event()
        stop_requested.append(stop)
        started.set_result(
            RunningServer(server, settings, port, server.metrics_port, asyncio.get_running_loop())
        )
        await stop.wait()
        await server.stop(stop_grace)

    thread = threading.Thread(target=asyncio.run, args=(serve(),), name="o2u-test-server", daemon=True)
    thread.start()
    running = started.result(timeout=120)
    try:
        yield running
    finally:
        running.loop.call_soon_threadsafe(stop_requested[0].set)
        thread.join(timeout=120)
        if thread.is_alive():
            raise RuntimeError("the test server did not stop within 120 s")


def _flip(labels: np.ndarray, fraction: float, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    count = round(fraction * len(labels))
    flipped = np.sort(rng.choice(len(labels), size=count, replace=False))
    labels[flipped] = (labels[flipped] + rng.integers(1, num_classes, size=count)) % num_classes
    return flipped


def write_noisy_digits(
    path: Path, *, samples: int = DIGITS_SAMPLES, noise: float = 0.1, seed: int = 0
) -> np.ndarray:
    """sklearn's 8x8 digits as 64-d feature vectors with `noise` of the labels flipped to another
    class, as `x`, `y`, `ids` (and `class_names`) in an .npz; returns the flipped sample ids."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(digits.target), size=samples, replace=False))
    features = (digits.data[chosen] / 16.0).astype(np.float32)
    labels = digits.target[chosen].astype(np.int64)
    flipped = _flip(labels, noise, 10, rng)
    ids = np.array([f"digit-{i:04d}" for i in chosen])
    names = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=features, y=labels, ids=ids, class_names=names)
    return flipped


def write_noisy_blobs(
    path: Path, *, samples: int = 240, classes: int = 4, noise: float = 0.1, seed: int = 0
) -> np.ndarray:
    """Well separated Gaussian blobs in 16-d with `noise` of the labels flipped; returns the flipped ids."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), samples // classes).astype(np.int64)
    centers = rng.normal(0.0, 4.0, size=(classes, 16))
    features = (centers[labels] + rng.normal(0.0, 1.0, size=(len(labels), 16))).astype(np.float32)
    flipped = _flip(labels, noise, classes, rng)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=features, y=labels)
    return flipped


def child_pids(name_prefix: str) -> set[int]:
    """The pids of this process's multiprocessing children whose name starts with `name_prefix`:
    "o2u-training" for training processes, "o2u-worker-" for data-parallel workers (never another
    child the test process may have)."""
    return {p.pid for p in multiprocessing.active_children() if p.name.startswith(name_prefix) and p.pid}


def create_job(
    stub: scoring_pb2_grpc.ScoringServiceStub, uri: str, config: dict[str, Any] | None = None, **fields: Any
) -> pb.ScoringJob:
    """CreateScoringJob for the dataset at `uri` (TINY_CONFIG unless `config` is given)."""
    request = pb.CreateScoringJobRequest(
        dataset=pb.DatasetRef(uri=uri),
        config=pb.ScoringConfig(**(TINY_CONFIG if config is None else config)),
        **fields,
    )
    job: pb.ScoringJob = stub.CreateScoringJob(request, timeout=30).job
    return job


def wait_for_job(
    stub: scoring_pb2_grpc.ScoringServiceStub,
    job_id: str,
    states: tuple[int, ...] = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED),
    timeout: float = 120.0,
) -> pb.ScoringJob:
    """Poll GetScoringJob until the job is in one of `states` (by default: finished)."""
    deadline = time.monotonic() + timeout
    while True:
        job: pb.ScoringJob = stub.GetScoringJob(pb.GetScoringJobRequest(job_id=job_id), timeout=10).job
        if job.state in states:
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {pb.JobState.Name(job.state)} after {timeout} s")
        time.sleep(0.05)


def assert_requeued_and_resumed(events: list[pb.JobEvent], cause: str) -> None:
    """A job's events show it put back in the queue once, for `cause` (a part of the message), and
    its second attempt going on from a cyclic epoch after the first."""
    requeued = [
        e for e in events if e.type == pb.JOB_EVENT_TYPE_STATE_CHANGED and e.state == pb.JOB_STATE_QUEUED
    ]
    assert len(requeued) == 2  # submitted, then put back
    assert cause in requeued[1].message
    assert requeued[1].message.endswith("it resumes from its last checkpoint")
    second = [
        e.sequence for e in events if e.state == pb.JOB_STATE_RUNNING and e.message.startswith("attempt 2")
    ]
    resumed = next(e for e in events if e.sequence > second[0] and e.progress.stage == pb.STAGE_CYCLIC)
    assert resumed.progress.epoch > 1  # the second attempt went on from the last epoch checkpointed


def sqlite_integrity(path: Path) -> str:
    """SQLite's `PRAGMA integrity_check` of a job store file ("ok" when it is sound)."""
    connection = sqlite3.connect(path)
    try:
        return str(connection.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        connection.close()


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    """The RpcError `call` raises (fails the test if it succeeds)."""
    try:
        call()
    except grpc.RpcError as error:
        return error
    raise AssertionError("the call succeeded, expected an error")


@dataclass
class ErrorDetails:
    """The google.rpc details of a failed call, by kind."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    fields: list[str] = field(default_factory=list)  # BadRequest field violations
    retry_delay_seconds: float | None = None
    resource: tuple[str, str] | None = None  # (type, name)


def error_details(error: grpc.RpcError) -> ErrorDetails:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    details = ErrorDetails(code=error.code(), message=error.details() or "")  # type: ignore[attr-defined]
    if status is None:
        return details
    for packed in status.details:
        if packed.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            packed.Unpack(info)
            details.reason = info.reason
        elif packed.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            packed.Unpack(bad)
            details.fields = [violation.field for violation in bad.field_violations]
        elif packed.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            packed.Unpack(retry)
            details.retry_delay_seconds = retry.retry_delay.ToTimedelta().total_seconds()
        elif packed.Is(error_details_pb2.ResourceInfo.DESCRIPTOR):
            resource = error_details_pb2.ResourceInfo()
            packed.Unpack(resource)
            details.resource = (resource.resource_type, resource.resource_name)
    return details


def call_error(call: Callable[[], object]) -> ErrorDetails:
    """The status code and details of the error `call` raises."""
    return error_details(rpc_error(call))
