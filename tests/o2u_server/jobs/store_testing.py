"""What the store tests share: a spec, run information, score rows and summaries to store, and a
shorthand for claiming the oldest queued job."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
from sqlalchemy import Connection
from sqlalchemy.exc import OperationalError

from o2u_server.domain import ClassNoise, DatasetSummary, Job, JobEvent, JobSpec, RunInfo, ScoreTuple
from o2u_server.jobs.store import JobStore, Lease

__all__ = ["INFO", "SPEC", "claim", "job_id", "lose_one_commit_reply", "score_rows", "summary"]

SPEC = JobSpec(dataset_uri="file:///data/x.npz", dataset_format=None, config={"seed": 1}, request_id="r-1")
INFO = RunInfo(1, "0.1.0", "2", "cpu", 4, 2, "{}", "0.1.0", "mlp")


def job_id(n: int) -> str:
    return f"job-{n:032x}"


def score_rows(n: int) -> list[ScoreTuple]:
    """n rows: rank r has score n - r and sample n - r; the first third is suspected."""
    return [
        (r, n - r, f"k{n - r}", r % 2, float(n - r), 0.1, 0.5, r <= n // 3, (r + 1) % 2, 0.9)
        for r in range(1, n + 1)
    ]


def summary(for_job: str) -> DatasetSummary:
    classes = [ClassNoise(0, "a", 3, 1, 1 / 3), ClassNoise(1, "b", 3, 1, 1 / 3)]
    return DatasetSummary(
        for_job, 6, 2, ["a", "b"], 0.3, 0.3, 2, classes, [0.5, 0.5, 0.5, 0.5], [], run_info=INFO
    )


def claim(
    store: JobStore, owner: str = "replica-a", *, now: float = 2.0, lease_seconds: float = 60.0
) -> tuple[Lease, Job, JobEvent]:
    """Claim the oldest queued job (the test fails if none waits)."""
    claimed = store.claims.claim_job(owner, now, lease_seconds=lease_seconds)
    assert claimed is not None, "no job was queued"
    return claimed


def lose_one_commit_reply(
    store: JobStore, monkeypatch: pytest.MonkeyPatch, *, durable_only: bool = True
) -> list[bool]:
    """Make the store's next durable write (any write, with `durable_only=False`) commit, then fail
    as a connection that broke before the COMMIT's reply does (PostgreSQL retries it). The list
    returned gets True once that happened."""
    if not store.db.postgresql:
        pytest.skip("SQLite writes are not retried: its connection cannot break at COMMIT")
    real_write = store.db.write
    broken: list[bool] = []

    @contextlib.contextmanager
    def write_losing_one_reply(*, durable: bool = False) -> Iterator[Connection]:
        with real_write(durable=durable) as conn:
            yield conn
        if (durable or not durable_only) and not broken:  # committed; the reply is lost
            broken.append(True)
            raise OperationalError("COMMIT", {}, Exception("server closed the connection unexpectedly"))

    monkeypatch.setattr(store.db, "write", write_losing_one_reply)
    return broken
