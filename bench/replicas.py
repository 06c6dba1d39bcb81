"""Replicas on one PostgreSQL: how the shared queue performs with 1, 2 and 3 server processes.

    PYTHONPATH=. python bench/replicas.py [--replicas 1 2 3] [--jobs 24] [--copy-rows 1000000]

For each replica count, on a fresh database of one throwaway PostgreSQL cluster (Debian's server
binaries, as the tests start it) with checkpoints in the S3 test server (moto):

- claim latency: 8 small jobs submitted one at a time to an idle cluster, round-robin over the
  replicas; the time from a job's QUEUED event (written by the replica that accepted it) to its
  RUNNING event (written by the replica that claimed it, often another one, woken by NOTIFY);
- throughput: `--jobs` small digits jobs (400 samples, 6 epochs) submitted at once, round-robin;
  jobs finished per minute from the first acceptance to the last final state;
- while they run, unary calls (GetScoringJob, ListScoringJobs) round-robin over the replicas, and a
  watch of every job on the replica after the one that accepted it: p50/p99 of the calls, and of
  event delivery (arrival at the watcher minus the event's time at the writer);
- database round trips per epoch: statements (pg_stat_statements, BEGIN/COMMIT included) while one
  job trains alone on one replica, divided by its epochs - progress, lease renewals and claims
  polling together.

Last, `--copy-rows` scores stored in one transaction through the store (COPY on PostgreSQL,
batched INSERTs on SQLite). Each replica trains on one CPU thread; on a machine with fewer cores
than replicas the throughput cannot scale, and the table says how many cores there were.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import grpc

from o2u.v1 import scoring_pb2 as pb
from o2u.v1 import scoring_pb2_grpc
from o2u_server.domain import ClassNoise, DatasetSummary, JobSpec, RunInfo
from o2u_server.jobs.store import JobStore
from tests.postgres_server import PostgresServer, running_postgres
from tests.s3_server import S3Server, running_s3_server
from tests.server_process import ServerProcess
from tests.server_testing import TINY_CONFIG, write_noisy_digits

SMALL: dict[str, Any] = {**TINY_CONFIG, "pretrain_epochs": 3, "num_cycles": 1}  # 5 epochs + ranking
QUIET: dict[str, Any] = {**TINY_CONFIG, "pretrain_epochs": 20, "cycle_length_epochs": 10, "num_cycles": 2}
FINAL = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _stub(replica: ServerProcess) -> tuple[grpc.Channel, scoring_pb2_grpc.ScoringServiceStub]:
    channel = grpc.insecure_channel(replica.address)
    return channel, scoring_pb2_grpc.ScoringServiceStub(channel)


def _submit(stub: scoring_pb2_grpc.ScoringServiceStub, uri: str, config: dict[str, Any]) -> str:
    request = pb.CreateScoringJobRequest(
        dataset=pb.DatasetRef(uri=uri), config=pb.ScoringConfig(**config), request_id=str(uuid.uuid4())
    )
    return str(stub.CreateScoringJob(request, timeout=30).job.job_id)


def _wait(stub: scoring_pb2_grpc.ScoringServiceStub, job_id: str) -> pb.ScoringJob:
    while (
        job := stub.GetScoringJob(pb.GetScoringJobRequest(job_id=job_id), timeout=30).job
    ).state not in FINAL:
        time.sleep(0.02)
    return job


def _events(stub: scoring_pb2_grpc.ScoringServiceStub, job_id: str) -> list[pb.JobEvent]:
    return [r.event for r in stub.WatchScoringJob(pb.WatchScoringJobRequest(job_id=job_id), timeout=120)]


def _statements(postgres: PostgresServer, url: str) -> int:
    rows = postgres.sql(
        "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements "
        "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
        database=url,
    )
    return int(rows[0][0])


def _replicas(n: int, workdir: Path, data_root: Path, url: str, s3: S3Server) -> list[ServerProcess]:
    settings = {
        "O2U_DATABASE_URL": url,
        "O2U_CHECKPOINT_URI": "s3://checkpoints/bench",
        "O2U_S3_ENDPOINT": s3.endpoint,
        "O2U_S3_ACCESS_KEY": s3.access_key,
        "O2U_S3_SECRET_KEY": s3.secret_key,
        "O2U_S3_SECURE": "false",
        "O2U_CPU_THREADS": "1",
        "O2U_MAX_QUEUED_JOBS": "1000",
        "O2U_LOG_LEVEL": "WARNING",
    }
    replicas = [ServerProcess(workdir / f"replica-{n}-{k}", data_root, **settings) for k in range(n)]
    for replica in replicas:
        replica.launch()
    for replica in replicas:
        replica.wait_serving()
    return replicas


def _claim_latencies(stubs: list[Any], uri: str) -> list[float]:
    latencies = []
    for k in range(8):
        stub = stubs[k % len(stubs)]
        job_id = _submit(stub, uri, SMALL)
        _wait(stub, job_id)
        changes = [e for e in _events(stub, job_id) if e.type == pb.JOB_EVENT_TYPE_STATE_CHANGED]
        latencies.append(
            (changes[1].event_time.ToNanoseconds() - changes[0].event_time.ToNanoseconds()) / 1e6
        )
    return latencies


def _load(stubs: list[Any], uri: str, jobs: int) -> dict[str, Any]:
    stop = threading.Event()
    unary: list[float] = []
    delivery: list[float] = []
    submitted: list[str] = []

    def probe() -> None:
        k = 0
        while not stop.is_set():
            stub = stubs[k % len(stubs)]
            started = time.perf_counter()
            if k % 2 and submitted:
                stub.GetScoringJob(pb.GetScoringJobRequest(job_id=submitted[k % len(submitted)]), timeout=30)
            else:
                stub.ListScoringJobs(pb.ListScoringJobsRequest(page_size=10), timeout=30)
            unary.append((time.perf_counter() - started) * 1e3)
            k += 1
            time.sleep(0.01)

    def watch(stub: Any, job_id: str) -> None:
        for response in stub.WatchScoringJob(pb.WatchScoringJobRequest(job_id=job_id), timeout=600):
            delivery.append((time.time_ns() - response.event.event_time.ToNanoseconds()) / 1e6)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    watchers = []
    for k in range(jobs):
        submitted.append(_submit(stubs[k % len(stubs)], uri, SMALL))
        watcher = threading.Thread(
            target=watch, args=(stubs[(k + 1) % len(stubs)], submitted[-1]), daemon=True
        )
        watcher.start()
        watchers.append(watcher)
    finished = [_wait(stubs[0], job_id) for job_id in submitted]
    stop.set()
    for thread in [prober, *watchers]:
        thread.join(timeout=60)
    first = min(job.create_time.ToNanoseconds() for job in finished)
    last = max(job.end_time.ToNanoseconds() for job in finished)
    return {
        "succeeded": sum(job.state == pb.JOB_STATE_SUCCEEDED for job in finished),
        "jobs_per_minute": len(finished) / ((last - first) / 1e9) * 60,
        "unary": unary,
        "delivery": delivery,
    }


def _round_trips(postgres: PostgresServer, url: str, stub: Any, uri: str) -> tuple[float, int]:
    """Statements per epoch while one job trains alone; it is followed through a watch, which the
    server feeds from memory, so the measurement adds no reads of its own."""
    job_id = _submit(stub, uri, QUIET)
    running = threading.Event()
    seen: list[pb.JobEvent] = []

    def watch() -> None:
        for response in stub.WatchScoringJob(pb.WatchScoringJobRequest(job_id=job_id), timeout=600):
            seen.append(response.event)
            if response.event.state == pb.JOB_STATE_RUNNING:
                running.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    running.wait(120)
    postgres.sql("SELECT pg_stat_statements_reset()", database=url)
    watcher.join(timeout=600)
    used = _statements(postgres, url)
    epochs = sum(1 for event in seen if event.type == pb.JOB_EVENT_TYPE_PROGRESS)
    return used / epochs, epochs


def _copy(url: str | Path, rows: int) -> float:
    store = JobStore(url)
    store.open()
    try:
        store.create_job("job-" + "0" * 31 + "1", JobSpec("file:///d.npz", None, {}), 1.0, max_queued=10)
        claimed = store.claims.claim_job("bench", 2.0, lease_seconds=600)
        assert claimed is not None
        info = RunInfo(0, "0", "0", "cpu", rows, 2, "{}", "0", "mlp")
        summary = DatasetSummary(
            claimed[0].job_id,
            rows,
            2,
            ["a", "b"],
            0.1,
            0.1,
            0,
            [ClassNoise(0, "a", 1, 0, 0.0)],
            [],
            [],
            run_info=info,
        )
        scores = (
            (r, r, f"sample-{r}", r % 2, 1.0 / r, 0.01, 0.5, r < rows // 10, (r + 1) % 2, 0.9)
            for r in range(1, rows + 1)
        )
        started = time.perf_counter()
        store.claims.save_results(claimed[0], scores, ["a", "b"], summary, info, 3.0)
        return time.perf_counter() - started
    finally:
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--copy-rows", type=int, default=1_000_000)
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    workdir = Path(tempfile.mkdtemp(prefix="o2u-bench-replicas-"))
    write_noisy_digits(workdir / "data" / "small.npz")
    uri = (workdir / "data" / "small.npz").as_uri()
    print(f"{os.cpu_count()} CPUs; jobs: 400 digits, 5 epochs and ranking, 1 torch thread per replica")
    statement_settings = (
        "shared_preload_libraries=pg_stat_statements",
        "pg_stat_statements.track_utility=on",
    )
    with running_postgres(settings=statement_settings) as postgres, running_s3_server() as s3:
        s3.make_bucket("checkpoints")
        print(
            "| replicas | claim latency p50 / max (ms) | jobs/min | unary p50 / p99 (ms) "
            "| watch delivery p50 / p99 (ms) |"
        )
        print("|---|---|---|---|---|")
        quiet: tuple[float, int] | None = None
        for n in args.replicas:
            url = postgres.new_database()
            replicas = _replicas(n, workdir, workdir / "data", url, s3)
            channels, stubs = zip(*(_stub(replica) for replica in replicas), strict=True)
            try:
                claims = _claim_latencies(list(stubs), uri)
                load = _load(list(stubs), uri, args.jobs)
                assert load["succeeded"] == args.jobs, load["succeeded"]
                if quiet is None:
                    postgres.sql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements", database=url)
                    quiet = _round_trips(postgres, url, stubs[0], uri)
            finally:
                for channel in channels:
                    channel.close()
                for replica in replicas:
                    replica.stop()
            print(
                f"| {n} | {_percentile(claims, 0.5):.0f} / {max(claims):.0f} "
                f"| {load['jobs_per_minute']:.0f} | "
                f"{_percentile(load['unary'], 0.5):.1f} / {_percentile(load['unary'], 0.99):.1f} | "
                f"{_percentile(load['delivery'], 0.5):.1f} / {_percentile(load['delivery'], 0.99):.1f} |"
            )
        if quiet is not None:
            print(f"\ndatabase round trips per epoch (one job alone, {quiet[1]} epochs): {quiet[0]:.1f}")
        copy_pg = _copy(postgres.new_database(), args.copy_rows)
        copy_sqlite = _copy(workdir / "copy.sqlite3", args.copy_rows)
        print(
            f"{args.copy_rows:,} scores stored: PostgreSQL (COPY) {copy_pg:.1f} s, SQLite {copy_sqlite:.1f} s"
        )


if __name__ == "__main__":
    main()
