"""When a crash counts against the job it interrupted, and what the job is told.

A job left RUNNING by a worker that is gone was interrupted by a crash: with SQLite, a server that
died (a drain puts its jobs back to QUEUED); with PostgreSQL, also a lease that expired because its
replica died, froze or lost the database for longer than `lease_seconds`, and that another replica
reclaimed (`ClaimStore.requeue_expired`). The crash may be the job's fault - a dataset or model that
runs the process out of memory dies at the same point every time - or nobody's: a node restart, a
deploy, a partition, an OOM kill caused by something else. Only the first kind may fail the job. So
a crash counts only when the interrupted attempt got no further in training than the furthest epoch
any earlier attempt reached (read from the job's event log, which every replica shares); a crash
after the job trained past that point resets the count. After `max_job_attempts` counted crashes
in a row the job is FAILED, with a message that names the dataset and the point where it was
interrupted, so it cannot take server after server down forever.

A data-parallel worker process that dies (killed by the kernel's OOM killer, a device fault) or a
collective that times out ends the attempt the same way without the server crashing: the attempt
requeues its own job (`ClaimStore.retry_job`) under the same rule and the same count, and after
`max_job_attempts` such failures in a row it is FAILED with TRAINING_WORKER_FAILED and the last
worker error.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Connection

from o2u_server.domain import EventType, JobError, JobEvent, JobState, Progress, Stage
from o2u_server.errors import Code
from o2u_server.jobs.event_log import EventLog
from o2u_server.jobs.transitions import transition
from o2u_server.text import shown

__all__ = ["attempt_progressed", "requeue_crashed", "too_many_crashes", "too_many_worker_failures"]

# Training stages in the order a job goes through them; LOADING and RANKING train nothing.
_TRAINING_ORDER = {Stage.PRETRAINING: 1, Stage.CYCLIC: 2, Stage.CLEAN_RETRAINING: 3}
_STAGE_NAMES = {
    Stage.PRETRAINING: "stage 1 (pre-training)",
    Stage.CYCLIC: "stage 2 (cyclic training)",
    Stage.CLEAN_RETRAINING: "stage 3 (clean retraining)",
}


def _point(event: JobEvent) -> tuple[int, int]:
    progress = event.progress
    if event.type is not EventType.PROGRESS or progress is None or progress.stage not in _TRAINING_ORDER:
        return (0, 0)
    return (_TRAINING_ORDER[progress.stage], progress.epoch)


def attempt_progressed(events: Sequence[JobEvent]) -> bool:
    """Whether the job's last attempt (its events since the last move to RUNNING) finished an epoch
    beyond the furthest one any earlier attempt finished."""
    starts = [
        index
        for index, event in enumerate(events)
        if event.type is EventType.STATE_CHANGED and event.state is JobState.RUNNING
    ]
    if not starts:
        return False
    before = max((_point(event) for event in events[: starts[-1]]), default=(0, 0))
    after = max((_point(event) for event in events[starts[-1] :]), default=(0, 0))
    return after > before


def _where(progress: Progress | None) -> str:
    if progress is None or progress.stage is Stage.LOADING:
        return "while it loaded the dataset"
    if progress.stage is Stage.RANKING:
        return "while it ranked the samples and stored the results"
    return f"in {_STAGE_NAMES[progress.stage]} after epoch {progress.epoch} of {progress.epochs_total}"


def too_many_crashes(dataset_uri: str, progress: Progress | None, crashes: int) -> JobError:
    """The error of a job failed after `crashes` counted crashes; `progress` is its last."""
    times = "time" if crashes == 1 else "times in a row"
    message = (
        f"the server process running this job ended abruptly (or stopped renewing its lease) {crashes} "
        f"{times}, each time "
        f"{_where(progress)} (dataset {shown(dataset_uri)}) and without the job getting further; the "
        "job is failed so that it cannot take the server down again. The usual cause is a dataset or "
        "model that needs more memory than the server has: check the dataset's size, sample and "
        "class counts, or choose a smaller model or batch, then submit a new job"
    )
    return JobError(int(Code.INTERNAL), message, "TOO_MANY_ATTEMPTS")


def too_many_worker_failures(
    dataset_uri: str, progress: Progress | None, crashes: int, last: str
) -> JobError:
    """The error of a job failed after `crashes` counted worker failures; `last` is the last one."""
    times = "time" if crashes == 1 else "times in a row"
    message = (
        f"a training worker of this job failed {crashes} {times}, each time {_where(progress)} (dataset "
        f"{shown(dataset_uri)}) and without the job getting further, so the job is failed; the last "
        f"failure: {last}. A worker killed by signal 9 is usually the kernel's out-of-memory killer: "
        "check the pod's memory limit and the dataset's size, or lower O2U_GPUS_PER_JOB, then submit "
        "a new job"
    )
    return JobError(int(Code.INTERNAL), message, "TRAINING_WORKER_FAILED")


def requeue_crashed(
    conn: Connection,
    log: EventLog,
    job_id: str,
    *,
    crashes: int,
    dataset_uri: str,
    progress: Progress | None,
    cause: str,
    now: float,
    max_attempts: int,
    worker_failure: bool = False,
) -> JobEvent | None:
    """Requeue a crashed job (its row locked by the caller), or fail it once `max_attempts` crashes
    in a row were its own; `crashes` is the count before this one, `cause` says what happened
    (`worker_failure`: a training worker failed, `cause` is its error)."""
    progressed = attempt_progressed(log.read(conn, job_id, 0))
    counted = 0 if progressed else crashes + 1
    if counted >= max_attempts:
        error = (
            too_many_worker_failures(dataset_uri, progress, counted, cause)
            if worker_failure
            else too_many_crashes(dataset_uri, progress, counted)
        )
        return transition(
            conn, log, job_id, JobState.FAILED, now, error=error, message=error.message, crashes=counted
        )
    verdict = (
        "the job trained further than before, so this does not count against it"
        if progressed
        else f"crash {counted} of {max_attempts} allowed without progress"
    )
    return transition(
        conn,
        log,
        job_id,
        JobState.QUEUED,
        now,
        message=f"{cause} ({verdict}); it resumes from its last checkpoint",
        crashes=counted,
        lease_owner=None,
        lease_expires_at=None,
    )
