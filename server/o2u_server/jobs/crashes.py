"""When a crash of the server counts against the job it was running, and what the job is told.

A job still RUNNING when the server starts was interrupted by a crash (a drain puts it back to
QUEUED). The crash may be the job's fault - a dataset or model that runs the process out of memory
dies at the same point every time - or nobody's: a node restart, a deploy, an OOM kill caused by
something else. Only the first kind may fail the job. So a crash counts only when the interrupted
attempt got no further in training than an earlier attempt had (its furthest epoch, read from the
job's event log); a crash after the job trained past its earlier furthest epoch resets the count.
After `max_job_attempts` counted crashes in a row the job is FAILED, with a message that names the
dataset and the point where the server died, so it cannot take the server down forever.
"""

from __future__ import annotations

from collections.abc import Sequence

from o2u_server.domain import EventType, JobError, JobEvent, JobState, Progress, Stage
from o2u_server.errors import Code
from o2u_server.text import shown

__all__ = ["attempt_progressed", "too_many_crashes"]

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
        f"the server process ended abruptly {crashes} {times} while running this job, each time "
        f"{_where(progress)} (dataset {shown(dataset_uri)}) and without the job getting further; the "
        "job is failed so that it cannot take the server down again. The usual cause is a dataset or "
        "model that needs more memory than the server has: check the dataset's size, sample and "
        "class counts, or choose a smaller model or batch, then submit a new job"
    )
    return JobError(int(Code.INTERNAL), message, "TOO_MANY_ATTEMPTS")
