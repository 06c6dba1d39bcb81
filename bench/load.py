"""Load benchmark: watch streams and unary calls against a live server while a job trains.

Opens `--watchers` concurrent WatchScoringJob streams (50 by default) on a training job and issues
GetScoringJob, ListScoringJobs and ListNoiseScores calls round-robin at `--rate` requests per
second (200) for `--duration` seconds (60), open loop: a call is started on schedule whether or not
earlier ones returned, up to a bound on calls in flight (beyond it the call is counted as skipped).
A separate channel checks health four times a second. It prints p50/p99 latency per method, error
counts, the server's RSS and open file descriptors at the start and end, and how fast the job kept
training while the calls ran (epochs and samples/s from its progress events), then one `summary:`
line. Everything stays on loopback: without `--address` it starts its own server process on
127.0.0.1 with a temporary state folder and the scikit-learn digits as the dataset; with `--address`
(loopback only) it loads that server, and `--pid` names the process to measure.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from o2u.v1 import scoring_pb2, scoring_pb2_grpc

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
CALL_TIMEOUT_S = 5.0
MAX_IN_FLIGHT = 64
METHODS = ("GetScoringJob", "ListScoringJobs", "ListNoiseScores")
FINAL = (scoring_pb2.JOB_STATE_SUCCEEDED, scoring_pb2.JOB_STATE_FAILED, scoring_pb2.JOB_STATE_CANCELLED)
# The training job: a small MLP on the digits with enough epochs to keep training for a while;
# when it finishes before the run does, another one is submitted so a job trains throughout.
TRAINING_CONFIG = scoring_pb2.ScoringConfig(
    model="mlp", seed=0, pretrain_epochs=10, cycle_length_epochs=10, num_cycles=30
)
RESULT_CONFIG = scoring_pb2.ScoringConfig(
    model="mlp", seed=0, pretrain_epochs=2, cycle_length_epochs=2, num_cycles=1
)


@dataclass
class MethodStats:
    latencies_s: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q) * 1e3) if self.latencies_s else float("nan")


@dataclass
class LoadReport:
    duration_s: float = 0.0
    unary: dict[str, MethodStats] = field(default_factory=dict)
    skipped: int = 0  # calls not started because MAX_IN_FLIGHT were outstanding
    watch_events: int = 0
    watch_reopened: int = 0
    watch: MethodStats = field(default_factory=MethodStats)
    health_checks: int = 0
    health_failures: int = 0
    jobs_submitted: int = 0
    usage: list[tuple[float, int, int]] = field(default_factory=list)  # (seconds, RSS bytes, open fds)
    # The training job's epochs reported while the calls ran, by (job id, sequence) so each counts
    # once however many streams saw it, with the samples/s each reported: whether the load slows it.
    epochs: dict[tuple[str, int], float] = field(default_factory=dict)

    @property
    def rss_bytes(self) -> tuple[int, int]:
        return (self.usage[0][1], self.usage[-1][1]) if self.usage else (0, 0)

    @property
    def open_fds(self) -> tuple[int, int]:
        return (self.usage[0][2], self.usage[-1][2]) if self.usage else (0, 0)

    @property
    def errors(self) -> int:
        """Calls the server answered with an error (or that timed out); skipped calls are not errors:
        they measure the load generator's in-flight bound, and `skipped` reports them."""
        every = [*self.unary.values(), self.watch]
        return sum(sum(stats.errors.values()) for stats in every)

    def lines(self) -> list[str]:
        out = [f"{'method':<18}{'calls':>8}{'errors':>8}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"]
        for name, stats in self.unary.items():
            latencies = stats.latencies_s or [float("nan")]
            out.append(
                f"{name:<18}{len(stats.latencies_s):>8}{sum(stats.errors.values()):>8}"
                f"{stats.percentile_ms(50):>9.2f}{stats.percentile_ms(99):>9.2f}{max(latencies) * 1e3:>9.2f}"
            )
        calls = sum(len(stats.latencies_s) for stats in self.unary.values())
        out.append(f"unary calls/s: {calls / max(self.duration_s, 1e-9):.1f}  skipped: {self.skipped}")
        watch_errors = sum(self.watch.errors.values())
        out.append(f"watch: events={self.watch_events} reopened={self.watch_reopened} errors={watch_errors}")
        out.append(f"health: checks={self.health_checks} failures={self.health_failures}")
        mib = 1024**2
        out.append(
            f"server: rss {self.rss_bytes[0] / mib:.1f} -> {self.rss_bytes[1] / mib:.1f} MiB, "
            f"open fds {self.open_fds[0]} -> {self.open_fds[1]}, jobs submitted {self.jobs_submitted}"
        )
        samples = ", ".join(f"{t:.0f}s {rss / mib:.0f} MiB {fds} fds" for t, rss, fds in self.usage)
        out.append(f"server samples: {samples}")
        out.append(
            f"training during the calls: {len(self.epochs)} epochs ({self.epochs_per_second:.1f}/s), "
            f"median {self.median_samples_per_second:.0f} samples/s"
        )
        return out

    @property
    def epochs_per_second(self) -> float:
        return len(self.epochs) / max(self.duration_s, 1e-9)

    @property
    def median_samples_per_second(self) -> float:
        return float(np.median(list(self.epochs.values()))) if self.epochs else float("nan")

    def summary(self) -> str:
        p99 = " ".join(f"{name}={stats.percentile_ms(99):.1f}" for name, stats in self.unary.items())
        mib = 1024**2
        return (
            f"summary: duration_s={self.duration_s:.1f} errors={self.errors} skipped={self.skipped} "
            f"p99_ms({p99}) "
            f"watch_events={self.watch_events} health_failures={self.health_failures} "
            f"rss_mib={self.rss_bytes[0] / mib:.0f}->{self.rss_bytes[1] / mib:.0f} "
            f"fds={self.open_fds[0]}->{self.open_fds[1]} "
            f"training_epochs_per_s={self.epochs_per_second:.1f}"
        )


def _code(error: BaseException) -> str:
    return error.code().name if isinstance(error, grpc.aio.AioRpcError) else type(error).__name__


def _usage(pid: int) -> tuple[int, int]:
    process = psutil.Process(pid)
    return process.memory_info().rss, process.num_fds()


async def _wait_final(stub: scoring_pb2_grpc.ScoringServiceAsyncStub, job_id: str, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = (
            await stub.GetScoringJob(scoring_pb2.GetScoringJobRequest(job_id=job_id), timeout=CALL_TIMEOUT_S)
        ).job
        if job.state in FINAL:
            return int(job.state)
        await asyncio.sleep(0.2)
    raise TimeoutError(f"job {job_id} did not finish within {timeout_s} s")


async def _submit(
    stub: scoring_pb2_grpc.ScoringServiceAsyncStub, uri: str, config: scoring_pb2.ScoringConfig
) -> str:
    request = scoring_pb2.CreateScoringJobRequest(
        dataset=scoring_pb2.DatasetRef(uri=uri),
        config=config,
        request_id=str(uuid.uuid4()),
        display_name="load",
    )
    response = await stub.CreateScoringJob(request, timeout=CALL_TIMEOUT_S)
    return str(response.job.job_id)


class _Load:
    """The concurrent parts of one run; they share the report and a stop flag."""

    def __init__(
        self, channels: tuple[grpc.aio.Channel, grpc.aio.Channel, grpc.aio.Channel], dataset_uri: str
    ):
        unary, watch, health = channels
        self.stub: scoring_pb2_grpc.ScoringServiceAsyncStub = scoring_pb2_grpc.ScoringServiceStub(unary)
        self.watch_stub: scoring_pb2_grpc.ScoringServiceAsyncStub = scoring_pb2_grpc.ScoringServiceStub(watch)
        self.health_stub = health_pb2_grpc.HealthStub(health)
        self.dataset_uri = dataset_uri
        self.report = LoadReport(unary={name: MethodStats() for name in METHODS})
        self.stop = asyncio.Event()
        self.measuring = False  # while drive_unary runs
        self.finished_id = ""
        self.training: list[str] = []  # training jobs in submission order; the last one is current

    async def prepare(self) -> None:
        # A finished job gives ListNoiseScores something to page through.
        self.finished_id = await _submit(self.stub, self.dataset_uri, RESULT_CONFIG)
        if await _wait_final(self.stub, self.finished_id, 300) != scoring_pb2.JOB_STATE_SUCCEEDED:
            raise RuntimeError(f"the result job {self.finished_id} did not succeed")
        self.training.append(await _submit(self.stub, self.dataset_uri, TRAINING_CONFIG))
        self.report.jobs_submitted = 2

    async def keep_training(self) -> None:
        while not self.stop.is_set():
            request = scoring_pb2.GetScoringJobRequest(job_id=self.training[-1])
            job = (await self.stub.GetScoringJob(request, timeout=CALL_TIMEOUT_S)).job
            if job.state in FINAL:
                self.training.append(await _submit(self.stub, self.dataset_uri, TRAINING_CONFIG))
                self.report.jobs_submitted += 1
            await asyncio.sleep(0.5)

    async def watch(self) -> None:
        """Follow the current training job like a real client: resume after the last event seen,
        and once the job has ended, wait for its successor instead of replaying it again."""
        job_id, last = "", 0
        while not self.stop.is_set():
            if self.training[-1] == job_id and last > 0:
                await asyncio.sleep(0.1)
                continue
            if self.training[-1] != job_id:
                job_id, last = self.training[-1], 0
                self.report.watch_reopened += 1
            request = scoring_pb2.WatchScoringJobRequest(job_id=job_id, after_sequence=last)
            try:
                async for response in self.watch_stub.WatchScoringJob(request):
                    self.report.watch_events += 1
                    last = response.event.sequence
                    self._count_epoch(job_id, response.event)
            except grpc.aio.AioRpcError as error:
                if not self.stop.is_set():
                    self.report.watch.error(_code(error))
                    await asyncio.sleep(0.1)

    def _count_epoch(self, job_id: str, event: scoring_pb2.JobEvent) -> None:
        rate = event.progress.samples_per_second
        if self.measuring and event.type == scoring_pb2.JOB_EVENT_TYPE_PROGRESS and rate > 0:
            self.report.epochs[(job_id, event.sequence)] = rate

    async def check_health(self) -> None:
        while not self.stop.is_set():
            self.report.health_checks += 1
            try:
                request = health_pb2.HealthCheckRequest(service="")
                answer = await self.health_stub.Check(request, timeout=1.0)
                if answer.status != health_pb2.HealthCheckResponse.SERVING:
                    self.report.health_failures += 1
            except grpc.aio.AioRpcError:
                self.report.health_failures += 1
            await asyncio.sleep(0.25)

    async def one_call(self, index: int) -> None:
        name = METHODS[index % len(METHODS)]
        started = time.perf_counter()
        try:
            if name == "GetScoringJob":
                get = scoring_pb2.GetScoringJobRequest(job_id=self.training[-1])
                await self.stub.GetScoringJob(get, timeout=CALL_TIMEOUT_S)
            elif name == "ListScoringJobs":
                jobs = scoring_pb2.ListScoringJobsRequest(page_size=20)
                await self.stub.ListScoringJobs(jobs, timeout=CALL_TIMEOUT_S)
            else:
                scores = scoring_pb2.ListNoiseScoresRequest(job_id=self.finished_id, page_size=100)
                await self.stub.ListNoiseScores(scores, timeout=CALL_TIMEOUT_S)
            self.report.unary[name].latencies_s.append(time.perf_counter() - started)
        except grpc.aio.AioRpcError as error:
            self.report.unary[name].error(_code(error))

    async def sample_usage(self, pid: int, every_s: float = 10.0) -> None:
        started = time.monotonic()
        while not self.stop.is_set():
            self.report.usage.append((time.monotonic() - started, *_usage(pid)))
            await asyncio.sleep(every_s)

    async def drive_unary(self, duration_s: float, rate: float) -> float:
        """Start calls on an open-loop schedule; return the seconds it ran."""
        in_flight: set[asyncio.Task[None]] = set()
        started = time.monotonic()
        self.measuring = True
        index = 0
        while (now := time.monotonic()) < started + duration_s:
            due = started + index / rate
            if due > now:
                await asyncio.sleep(due - now)
            if len(in_flight) >= MAX_IN_FLIGHT:
                self.report.skipped += 1
            else:
                task = asyncio.create_task(self.one_call(index))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            index += 1
        if in_flight:
            await asyncio.wait(in_flight, timeout=CALL_TIMEOUT_S + 1)
        self.measuring = False
        return time.monotonic() - started


async def run_load(
    address: str,
    dataset_uri: str,
    *,
    pid: int,
    duration_s: float = 60.0,
    rate: float = 200.0,
    watchers: int = 50,
) -> LoadReport:
    """Drive the load against the server at `address` (loopback only) and measure process `pid`."""
    if address.rsplit(":", 1)[0] not in LOOPBACK_HOSTS:
        raise ValueError(f"the load benchmark runs on loopback only, got {address!r}")
    async with (
        grpc.aio.insecure_channel(address) as unary,
        grpc.aio.insecure_channel(address) as watch,
        grpc.aio.insecure_channel(address) as health,
    ):
        load = _Load((unary, watch, health), dataset_uri)
        await load.prepare()
        background = [asyncio.create_task(load.keep_training()), asyncio.create_task(load.check_health())]
        background += [asyncio.create_task(load.watch()) for _ in range(watchers)]
        await asyncio.sleep(1.0)  # let the streams open before the first measurement
        background.append(asyncio.create_task(load.sample_usage(pid)))
        load.report.duration_s = await load.drive_unary(duration_s, rate)
        load.report.usage.append((load.report.duration_s, *_usage(pid)))
        load.stop.set()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        for job_id in load.training:
            cancel = scoring_pb2.CancelScoringJobRequest(job_id=job_id)
            await load.stub.CancelScoringJob(cancel, timeout=CALL_TIMEOUT_S)
    return load.report


# ---------------------------------------------------------------------------------------------------
# A server process of our own, on loopback
# ---------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def write_digits_npz(path: Path) -> None:
    """scikit-learn's 1,797 real 8x8 digits as (N, 64) float32 features with their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    features = (digits.data / 16.0).astype(np.float32)  # (N, 64); pixel values are 0..16
    np.savez(path, x=features, y=digits.target.astype(np.int64))


def wait_serving(address: str, timeout_s: float, process: subprocess.Popen[bytes] | None = None) -> None:
    """Block until the server's health service answers SERVING (or the process exits)."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the server exited with code {process.returncode} before serving")
            try:
                answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"the server at {address} was not SERVING within {timeout_s} s")


@contextmanager
def server_process(workdir: Path, data_root: Path, device: str = "cpu") -> Iterator[tuple[str, int]]:
    """`python -m o2u_server.main` on a free loopback port (on `device`, state under `workdir`,
    datasets under `data_root`), serving when entered; yields (address, pid) and stops it on exit."""
    address = f"127.0.0.1:{_free_port()}"
    env = {
        **os.environ,
        "O2U_LISTEN_ADDRESS": address,
        "O2U_METRICS_ADDRESS": "127.0.0.1",
        "O2U_METRICS_PORT": "0",
        "O2U_STATE_DIR": str(workdir / "state"),
        "O2U_DATA_ROOTS": str(data_root),
        "O2U_DEVICE": device,
        "O2U_LOG_LEVEL": "WARNING",
    }
    with (workdir / "server.log").open("wb") as log:
        command = [sys.executable, "-m", "o2u_server.main"]
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_serving(address, 120, process)
            yield address, process.pid
        finally:
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextmanager
def local_server(workdir: Path) -> Iterator[tuple[str, int, str]]:
    """Start `python -m o2u_server.main` on 127.0.0.1; yield (address, pid, dataset URI)."""
    data_root = workdir / "data"
    data_root.mkdir(parents=True, exist_ok=True)
    dataset = data_root / "digits.npz"
    write_digits_npz(dataset)
    with server_process(workdir, data_root) as (address, pid):
        yield address, pid, dataset.as_uri()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    parser.add_argument("--rate", type=float, default=200.0, help="unary requests per second (default 200)")
    parser.add_argument("--watchers", type=int, default=50, help="concurrent watch streams (default 50)")
    parser.add_argument("--address", help="a live server on loopback (default: start one)")
    parser.add_argument("--pid", type=int, help="with --address: the server's process id, for RSS and fds")
    parser.add_argument("--dataset-uri", help="with --address: a dataset the server can read")
    args = parser.parse_args(argv)
    options = {"duration_s": args.duration, "rate": args.rate, "watchers": args.watchers}
    if args.address:
        if args.pid is None or args.dataset_uri is None:
            parser.error("--address needs --pid and --dataset-uri")
        report = asyncio.run(run_load(args.address, args.dataset_uri, pid=args.pid, **options))
    else:
        with (
            tempfile.TemporaryDirectory(prefix="o2u-load-") as workdir,
            local_server(Path(workdir)) as (address, pid, dataset_uri),
        ):
            print(f"server: {address} pid {pid}", flush=True)
            report = asyncio.run(run_load(address, dataset_uri, pid=pid, **options))
    print("\n".join(report.lines()))
    print(report.summary())
    return 0 if report.errors == 0 and report.health_failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
