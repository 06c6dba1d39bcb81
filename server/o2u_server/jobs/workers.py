"""How many workers train one job, on which devices, and the engine that runs them.

`O2U_GPUS_PER_JOB` sets the job's world size: on a GPU server every job trains on that many GPUs
at once (default: all visible GPUs, so one job at a time uses the whole pod), and the worker slots
are the groups of GPUs (`slot_devices`: slot i starts at GPU i * world size). On the CPU the
default is 1 (a single in-process trainer, as before); more starts that many gloo workers, which
share the CPUs, so it is for testing the distributed path rather than for speed.

With more than one worker the job's attempt calls `o2u_engine.launch.score_noise_workers` in place
of `score_noise` (`job_engine`): the worker processes are children of the server, the attempt's
thread relays worker 0's progress (samples/s of the whole global batch, so of all workers),
cancellation reaches every worker within one batch, worker 0 alone writes the checkpoint the
server syncs, and everything else (leases, fencing, crash accounting, out-of-memory and divergence
errors) is the attempt's as with one worker. A worker that dies, or a collective that waits past
`COLLECTIVE_TIMEOUT_SECONDS`, ends the attempt: the other workers are stopped and the job goes back
to the queue to resume from its last checkpoint, counted as a crash of the attempt (`jobs.crashes`:
FAILED with TRAINING_WORKER_FAILED after `max_job_attempts` such failures without progress); the
workers die with the server (they ask the kernel for SIGKILL when their parent exits), so a
crashed server leaves no training behind and its job resumes from the checkpoint elsewhere.

With one worker and `O2U_TRAINING_ISOLATION=process` the attempt calls
`o2u_engine.process.TrainingProcesses.score_noise`: the same call in a long-lived child process
kept per device (one per worker slot, started with the runner), with the same relaying, checkpoint
and failure handling; a child that dies fails the attempt as a dead worker does and the next
attempt starts a fresh one.
"""

from __future__ import annotations

from functools import partial

import torch

from o2u_server.jobs.engine import Engine, TrainingProcesses, score_noise_workers
from o2u_server.settings import Settings

__all__ = ["COLLECTIVE_TIMEOUT_SECONDS", "job_engine", "slot_devices", "world_size"]

COLLECTIVE_TIMEOUT_SECONDS = 300.0  # a worker waiting this long for the others gives up


def _uses_cuda(settings: Settings) -> bool:
    return settings.device != "cpu" and torch.cuda.is_available()


def world_size(settings: Settings) -> int:
    """Workers per job: O2U_GPUS_PER_JOB, else every visible GPU, else 1 on the CPU."""
    if settings.gpus_per_job is not None:
        return settings.gpus_per_job
    return torch.cuda.device_count() if _uses_cuda(settings) else 1


def slot_devices(settings: Settings) -> list[str]:
    """The first device of each worker slot (the job's workers use the next world_size GPUs)."""
    workers = world_size(settings)
    if not _uses_cuda(settings):
        return ["cpu"] * (settings.max_concurrent_jobs or 1)
    count = torch.cuda.device_count()
    if workers > count:
        raise RuntimeError(f"O2U_GPUS_PER_JOB={workers} but torch sees {count} CUDA devices")
    groups = count // workers
    return [f"cuda:{(index % groups) * workers}" for index in range(settings.max_concurrent_jobs or groups)]


def job_engine(settings: Settings) -> Engine:
    """The engine an attempt calls: for one worker in the attempt's thread, or in the slot's
    training process (`training_isolation`); worker processes for more."""
    workers = world_size(settings)
    if workers == 1 and settings.training_isolation == "process":
        processes = TrainingProcesses()
        return Engine(score_noise=processes.score_noise, processes=processes)
    if workers == 1:
        return Engine()
    run = partial(
        score_noise_workers, world_size=workers, collective_timeout_seconds=COLLECTIVE_TIMEOUT_SECONDS
    )
    return Engine(score_noise=run, world_size=workers)
