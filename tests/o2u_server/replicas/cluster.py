"""Three `o2u-server` replicas as real processes on loopback, sharing one PostgreSQL database (the
job queue), one S3 bucket (checkpoints) and two export locations (a prefix of another bucket, and
a folder all three can write: a shared volume), for the multi-replica tests.

Leases are short (LEASE_SECONDS) so takeovers happen within seconds, checkpoints are written after
every epoch (so a takeover resumes from inside stage 2), and each replica trains on one CPU thread
(three replicas share two cores). `Cluster.owner(job_id)` reads from the database which replica
holds a job's lease; `revive()` restarts replicas a test killed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from o2u.v1 import scoring_pb2 as pb
from o2u.v1 import scoring_pb2_grpc
from tests.postgres_server import PostgresServer
from tests.s3_server import S3Server
from tests.server_process import ServerProcess

__all__ = [
    "CHECKPOINT_BUCKET",
    "EXPORT_BUCKET",
    "LEASE_SECONDS",
    "Cluster",
    "Stub",
    "events",
    "get",
    "scores",
    "start_cluster",
    "state_changes",
    "wait_until",
]

Stub = scoring_pb2_grpc.ScoringServiceStub
LEASE_SECONDS = 4.0
CHECKPOINT_BUCKET = "checkpoints"
EXPORT_BUCKET = "exports"
REPLICAS = 3


@dataclass
class Cluster:
    replicas: list[ServerProcess]
    postgres: PostgresServer
    database_url: str
    s3: S3Server
    export_folder: Path  # exports may go here, and under s3://EXPORT_BUCKET/o2u

    @contextmanager
    def stub(self, replica: ServerProcess) -> Iterator[Stub]:
        with grpc.insecure_channel(replica.address) as channel:
            yield Stub(channel)

    def sql(self, statement: str, *params: Any) -> list[tuple[Any, ...]]:
        return self.postgres.sql(statement, *params, database=self.database_url)

    def owner(self, job_id: str) -> ServerProcess | None:
        """The replica whose process holds the job's lease now (None when no live lease)."""
        rows = self.sql("SELECT lease_owner FROM jobs WHERE job_id = %s AND state = 'running'", job_id)
        if not rows or rows[0][0] is None:
            return None
        pid = int(str(rows[0][0]).rsplit("/", 1)[1])
        return next((replica for replica in self.replicas if replica.alive and replica.pid == pid), None)

    def wait_owner(
        self, job_id: str, *, other_than: ServerProcess | None = None, timeout: float = 120
    ) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            owner = self.owner(job_id)
            if owner is not None and owner is not other_than:
                return owner
            time.sleep(0.05)
        raise AssertionError(f"no replica (other than {other_than}) claimed {job_id}")

    def others(self, *excluded: ServerProcess) -> list[ServerProcess]:
        return [replica for replica in self.replicas if replica not in excluded and replica.alive]

    def checkpoints(self, job_id: str) -> list[str]:
        client = self.s3.client()
        return [
            str(found.object_name)
            for found in client.list_objects(CHECKPOINT_BUCKET, f"o2u/{job_id}/", recursive=True)
        ]

    def revive(self) -> None:
        dead = [replica for replica in self.replicas if not replica.alive]
        for replica in dead:
            replica.launch()
        for replica in dead:
            replica.wait_serving()

    def stop(self) -> None:
        for replica in self.replicas:
            replica.stop()


def start_cluster(tmp: Path, data_root: Path, postgres: PostgresServer, s3: S3Server) -> Cluster:
    url = postgres.new_database()
    s3.make_bucket(CHECKPOINT_BUCKET)
    s3.make_bucket(EXPORT_BUCKET)
    export_folder = tmp / "exports"
    export_folder.mkdir()
    settings = {
        "O2U_DATABASE_URL": url,
        "O2U_CHECKPOINT_URI": f"s3://{CHECKPOINT_BUCKET}/o2u",
        "O2U_S3_ENDPOINT": s3.endpoint,
        "O2U_S3_ACCESS_KEY": s3.access_key,
        "O2U_S3_SECRET_KEY": s3.secret_key,
        "O2U_S3_SECURE": "false",
        "O2U_S3_REGION": s3.region,
        "O2U_LEASE_SECONDS": str(LEASE_SECONDS),
        "O2U_CHECKPOINT_INTERVAL_SECONDS": "0",
        "O2U_MAX_JOB_ATTEMPTS": "6",
        "O2U_CPU_THREADS": "1",
        "O2U_SHUTDOWN_GRACE_SECONDS": "5",
        "O2U_EXPORT_URIS": f"s3://{EXPORT_BUCKET}/o2u,{export_folder.as_uri()}",
    }
    replicas = [ServerProcess(tmp / f"replica-{n}", data_root, **settings) for n in range(REPLICAS)]
    cluster = Cluster(replicas, postgres, url, s3, export_folder)
    try:
        cluster.revive()
    except BaseException:
        cluster.stop()
        raise
    return cluster


def events(stub: Stub, job_id: str, after: int = 0) -> list[pb.JobEvent]:
    request = pb.WatchScoringJobRequest(job_id=job_id, after_sequence=after)
    return [response.event for response in stub.WatchScoringJob(request, timeout=120)]


def scores(stub: Stub, job_id: str) -> dict[int, tuple[Any, ...]]:
    """Every score of a finished job, by sample id."""
    fields = ("score", "score_variance", "rank", "noise_probability", "suspected", "suggested_label")
    found: dict[int, tuple[Any, ...]] = {}
    token = ""
    while True:
        request = pb.ListNoiseScoresRequest(job_id=job_id, page_size=1000, page_token=token)
        page = stub.ListNoiseScores(request, timeout=30)
        for score in page.noise_scores:
            found[score.sample_id] = tuple(getattr(score, name) for name in fields)
        if not (token := page.next_page_token):
            return found


def get(stub: Stub, job_id: str) -> pb.ScoringJob:
    job: pb.ScoringJob = stub.GetScoringJob(pb.GetScoringJobRequest(job_id=job_id), timeout=30).job
    return job


def wait_until(stub: Stub, job_id: str, done: Any, timeout: float = 180) -> pb.ScoringJob:
    """Poll the job until `done(job)`; calls that fail while the database restarts are retried."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            job = get(stub, job_id)
        except grpc.RpcError as error:
            if error.code() is not grpc.StatusCode.UNAVAILABLE:  # type: ignore[attr-defined]
                raise
        else:
            if done(job):
                return job
        time.sleep(0.05)
    raise AssertionError(f"{job_id} did not get there within {timeout} s")


def state_changes(found: list[pb.JobEvent]) -> list[int]:
    return [event.state for event in found if event.type == pb.JOB_EVENT_TYPE_STATE_CHANGED]
