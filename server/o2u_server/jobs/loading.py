"""What the runner adds to loading a job's dataset: progress while it reads, and the check that a
resumed job still has the data it started training on.

`loading_progress` turns the reads a job's storage view reports into LOADING progress events, at
most one per LOADING_PROGRESS_SECONDS (a dataset of a million images would otherwise log a million
events). `check_unchanged` compares the loaded dataset's content digest with the one an earlier
attempt recorded in the job's run info: a resumed job may not mix two datasets in one result.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from o2u_server.datasets import LoadedDataset
from o2u_server.domain import Job, Progress, Stage
from o2u_server.errors import FailedPrecondition
from o2u_server.text import shown

__all__ = ["LOADING_PROGRESS_SECONDS", "check_unchanged", "loading_progress"]

LOADING_PROGRESS_SECONDS = 1.0  # least time between two LOADING progress events of a job


def loading_progress(record: Callable[[Progress], None]) -> Callable[[int, int], None]:
    """A `(bytes_read, files_read)` callback (several reader threads may call it) that records a
    LOADING progress event at most every LOADING_PROGRESS_SECONDS."""
    last = [time.monotonic()]
    lock = threading.Lock()

    def on_read(bytes_read: int, files_read: int) -> None:
        with lock:
            now = time.monotonic()
            if now - last[0] < LOADING_PROGRESS_SECONDS:
                return
            last[0] = now
        record(Progress(Stage.LOADING, bytes_read=bytes_read, files_read=files_read))

    return on_read


def check_unchanged(job: Job, dataset: LoadedDataset) -> None:
    """FailedPrecondition (DATASET_CHANGED) if an earlier attempt of `job` loaded other data."""
    earlier = job.run_info.dataset_digest if job.run_info is not None else ""
    if earlier and earlier != dataset.digest:
        uri = shown(job.spec.dataset_uri)
        raise FailedPrecondition(
            f"the dataset {uri} changed since this job started training on it (attempt "
            f"{job.attempts}): its samples, labels, keys or class names differ, and the job cannot "
            "mix two datasets in one result; submit a new job for the new data",
            reason="DATASET_CHANGED",
            resource_type="dataset",
            resource_name=uri,
        )
