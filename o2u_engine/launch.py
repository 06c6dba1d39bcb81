"""`score_noise_workers`: `score_noise` over `world_size` worker processes of this machine.

The calling process starts the workers (torch.multiprocessing, `spawn`: no state of the caller is
inherited), which meet through a file store in a fresh temporary folder rather than at a port picked
in advance, which another process could take first (gloo on the CPU, NCCL with one GPU each from
`first_gpu` on), and train as `distributed.DistributedTrainer`. The samples go to the workers
through shared memory, not a copy each. The caller's thread stays in charge: it relays worker 0's
progress events to `progress`, polls `should_cancel` every `POLL_SECONDS` and tells the workers
(they agree to stop at the next batch), and watches the processes: a worker that exits without a
result stops the others and raises `WorkerFailed`, whatever the others were waiting for. An
exception raised in a worker is raised again in the caller as `rebuilt_error` has it, the rule
`o2u_engine.process` follows too: the engine's own (Cancelled, ConfigError, TrainingDiverged,
DeviceOutOfMemory, DataValidationError) with their message, field and index; memory as memory;
a failed collective (a peer that died or hung) as `WorkerFailed`; anything else as `TrainingError`
naming its type, since running it again fails the same way. With `world_size` 1 it is
`score_noise` in the calling process.
"""

from __future__ import annotations

import ctypes
import math
import os
import signal
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing import connection as mp_connection
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from o2u_engine.config import O2UConfig
from o2u_engine.distributed import CollectiveFailed
from o2u_engine.errors import Cancelled, ConfigError, DataValidationError, DeviceOutOfMemory, TrainingDiverged
from o2u_engine.report import NoiseReport, ProgressEvent
from o2u_engine.runtime import available_cpu_count
from o2u_engine.score import score_noise

POLL_SECONDS = 0.1  # how often the caller checks cancellation and the workers' health
EXIT_GRACE_SECONDS = 10.0  # workers are given this long to exit after a result or an error
# After a cancel, the longest worker 0 is waited for while it writes its checkpoint (the others stop
# at once, as it does after the write).
CHECKPOINT_FLUSH_SECONDS = 120.0
_PR_SET_PDEATHSIG = 1  # prctl option: the signal a process gets when its parent exits
_ERRORS: dict[str, type[Exception]] = {
    cls.__name__: cls
    for cls in (Cancelled, ConfigError, TrainingDiverged, DeviceOutOfMemory, DataValidationError)
}


class WorkerFailed(RuntimeError):
    """A training worker exited without a result (killed, crashed, or a collective timed out)."""


class TrainingError(RuntimeError):
    """An exception other than the engine's own ended the run in a training process; the message
    starts with its type name (its traceback is in the process's standard error)."""


# What a training process sends for an exception: its type's name, message, field and index.
ErrorPayload = tuple[str, str, "str | None", "int | None"]


def error_payload(error: BaseException) -> ErrorPayload:
    """`error` as it crosses a pipe to the caller (an exception object may not survive pickling).
    An error that `rebuilt_error` does not raise as itself (the engine's own, memory, a failed
    collective) is a fault of the process's own: its traceback goes to the process's standard
    error first, since the caller gets only its type and message."""
    if not isinstance(error, (*_ERRORS.values(), CollectiveFailed, MemoryError)):
        traceback.print_exception(error)
    return (type(error).__name__, str(error), getattr(error, "field", None), getattr(error, "index", None))


def rebuilt_error(name: str, message: str, field: str | None, index: int | None) -> Exception:
    """The exception a training process raised, as the caller of `score_noise` in its own thread
    would get it: the engine's own as itself; memory as memory (the job fails as out of memory, not
    as a crash to retry); a collective that failed, because a peer died or hung, as WorkerFailed (a
    retry may succeed); anything else as TrainingError, a fault that running again repeats."""
    if name == "MemoryError":
        return MemoryError(message)
    if name == "OutOfMemoryError":  # torch's, where the engine could not halve the batch
        return DeviceOutOfMemory(f"training ran out of device memory: {message}")
    if name == CollectiveFailed.__name__:
        return WorkerFailed(message)
    cls = _ERRORS.get(name)
    if cls is None:
        return TrainingError(f"{name}: {message}")
    if cls is DataValidationError:
        return DataValidationError(message, field=field or "features", index=index)
    if issubclass(cls, ConfigError):
        return cls(message, field=field or "config")
    return cls(message)


class SharedMemoryFull(WorkerFailed):
    """Shared memory (/dev/shm) could not hold the samples for the training processes: no worker
    started, and trying again only helps once other jobs have freed some."""

    def __init__(self, message: str, nbytes: int) -> None:
        super().__init__(message)
        self.nbytes = nbytes  # the samples that did not fit


@dataclass(frozen=True)
class _WorkerJob:
    features: torch.Tensor  # shared memory
    labels: torch.Tensor
    options: dict[str, Any]  # score_noise's keyword arguments, less device and callbacks
    world_size: int
    rendezvous: str  # the file store's path, in a folder of this launch only
    gpu: int | None  # the first GPU, None on the CPU
    threads: int
    timeout_seconds: float
    parent: int  # the caller's process id


def shared_array(shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
    """An uninitialized C-ordered array in shared memory (/dev/shm), for a loader to decode samples
    into: `shared_tensor` of it, or of any view of it, moves nothing. SharedMemoryFull when shared
    memory cannot hold it."""
    dtype = np.dtype(dtype)
    buffer = _share(torch.empty(math.prod(shape) * dtype.itemsize, dtype=torch.uint8))
    return buffer.numpy().view(dtype).reshape(shape)


def shared_tensor(values: np.ndarray | torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`values` as a tensor in shared memory, for child processes to read without a copy each;
    SharedMemoryFull naming the cause when shared memory (/dev/shm) cannot hold it. An array of
    `shared_array` (or a view of one) becomes a tensor over that memory, and a CPU tensor (of
    `dtype`, if given) is moved there in place (`Tensor.share_memory_`) and returned, so samples
    already there are not copied again. Non-native byte order is converted (torch has none)."""
    if isinstance(values, torch.Tensor):
        tensor = values
    else:
        array = np.asarray(values)
        view = _shared_view(array)
        if view is not None:
            tensor = view
        else:
            if not array.dtype.isnative:  # a big-endian .npz, say
                array = array.astype(array.dtype.newbyteorder("="))
            with warnings.catch_warnings():  # a read-only array (a memmap) is copied below, never written
                warnings.simplefilter("ignore", UserWarning)
                tensor = torch.as_tensor(array)
    return _share(tensor.to("cpu", dtype=dtype))  # .to is the tensor itself when it is already that


def _shared_view(array: np.ndarray) -> torch.Tensor | None:
    """`array` as a tensor over the shared memory it lies in (an array of `shared_array`), else None."""
    owner: object = array
    while isinstance(owner, np.ndarray):
        owner = owner.base
    if not isinstance(owner, torch.Tensor) or not array.dtype.isnative:
        return None
    if not owner.is_shared():  # type: ignore[no-untyped-call]
        return None
    try:
        layout = torch.from_numpy(array)  # dtype, shape and strides, over the same memory
    except (TypeError, ValueError):  # a dtype torch lacks, or negative strides
        return None
    offset, itemsize = array.ctypes.data - owner.data_ptr(), array.dtype.itemsize
    if offset % itemsize:
        return None
    view = torch.empty(0, dtype=layout.dtype)
    return view.set_(owner.untyped_storage(), offset // itemsize, layout.shape, layout.stride())


def _share(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` (on the CPU) moved into shared memory in place, or SharedMemoryFull."""
    try:
        return tensor.share_memory_()  # type: ignore[no-untyped-call,no-any-return]
    except RuntimeError as error:
        raise SharedMemoryFull(
            f"could not place {tensor.nbytes:,} bytes of samples in shared memory (/dev/shm) for the "
            f"training processes: {error}; it must hold the largest decoded dataset (the chart's "
            "shm.sizeLimit)",
            tensor.nbytes,
        ) from error


def _die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this worker when the caller exits (Linux), so a crashed caller
    leaves no training behind; exit at once if it is already gone. SIGINT and SIGTERM are left to
    the caller, which stops its workers through `cancel` once it has decided to (a Ctrl-C in a
    terminal reaches the whole process group, and must not kill a worker before the caller has
    asked it to checkpoint)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the collectives' timeout ends the worker
        pass
    if os.getppid() != parent:
        os._exit(1)


def score_noise_workers(
    features: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    *,
    world_size: int,
    device: str = "cpu",
    progress: Callable[[ProgressEvent], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    collective_timeout_seconds: float = 300.0,
    config: O2UConfig = O2UConfig(),  # noqa: B008 - frozen
    **options: Any,
) -> NoiseReport:
    """`score_noise(features, labels, config=config, **options)` on `world_size` workers; `device`
    is "cpu" or the first GPU ("cuda:N", workers on cuda:N..N+world_size-1)."""
    if world_size < 1:
        raise ConfigError(f"world_size: got {world_size}, expected >= 1", field="world_size")
    if world_size == 1:
        return score_noise(
            features,
            labels,
            config=config,
            device=device,
            progress=progress,
            should_cancel=should_cancel,
            **options,
        )
    gpu = None if torch.device(device).type == "cpu" else (torch.device(device).index or 0)
    try:
        rendezvous = tempfile.TemporaryDirectory(prefix="o2u-rendezvous-")
    except OSError as error:  # a full or read-only temporary directory: no worker can start
        raise WorkerFailed(
            "could not create the training workers' rendezvous folder in the server's temporary "
            f"directory: {error.strerror or error}; it must be writable (the chart mounts a volume "
            "at /tmp)"
        ) from error
    with rendezvous as folder:
        return _launch(
            _WorkerJob(
                features=shared_tensor(features),
                labels=shared_tensor(labels, torch.int64),
                options={"config": config, **options},
                world_size=world_size,
                rendezvous=os.path.join(folder, "store"),
                gpu=gpu,
                threads=max(1, available_cpu_count() // world_size),
                timeout_seconds=collective_timeout_seconds,
                parent=os.getpid(),
            ),
            progress,
            should_cancel,
        )


def _launch(
    job: _WorkerJob,
    progress: Callable[[ProgressEvent], None] | None,
    should_cancel: Callable[[], bool] | None,
) -> NoiseReport:
    """Start `job.world_size` workers, supervise them to the report, and never leave one running."""
    context = mp.get_context("spawn")
    cancel = context.Event()
    # A one-way pipe per worker whose writing end only that worker holds once it has started: if it
    # dies, even in the middle of a message, reading here ends (EOFError) instead of waiting forever.
    pipes = [context.Pipe(duplex=False) for _ in range(job.world_size)]
    processes = [
        context.Process(
            target=_worker, args=(rank, job, pipes[rank][1], cancel), daemon=True, name=f"o2u-worker-{rank}"
        )
        for rank in range(job.world_size)
    ]
    readers = [reader for reader, _ in pipes]
    started: list[Any] = []
    try:
        for process, (_, writer) in zip(processes, pipes, strict=True):
            process.start()  # may fail (no memory or processes left): the ones started stop below
            started.append(process)
            writer.close()
        return _supervise(processes, readers, cancel, progress, should_cancel)
    finally:
        cancel.set()  # a caller that stopped listening (its progress callback raised) stops them too
        # Workers left waiting for one that never started have nothing to save: stopped at once.
        grace = EXIT_GRACE_SECONDS if len(started) == len(processes) else 0.0
        for process in started:
            process.join(grace)
            if process.is_alive():
                process.kill()
                process.join()
        for reader, writer in pipes:
            reader.close()
            writer.close()  # a worker that never started leaves its writing end here


def _supervise(
    processes: list[Any],
    readers: list[Any],
    cancel: Any,
    progress: Callable[[ProgressEvent], None] | None,
    should_cancel: Callable[[], bool] | None,
) -> NoiseReport:
    """Relay events until worker 0's report or the first error; raise for a worker that died. A
    cancel reaches every worker at the same batch, and worker 0 writes its checkpoint before it
    stops, so another worker's Cancelled waits for worker 0's (up to CHECKPOINT_FLUSH_SECONDS):
    acting on the first one killed worker 0 in the middle of the write."""
    open_readers = list(readers)
    cancelled: ErrorPayload | None = None  # a worker's Cancelled, held for worker 0's
    flushed_by = 0.0
    while True:
        if cancelled is not None and (readers[0] not in open_readers or time.monotonic() > flushed_by):
            _check_alive(processes)  # worker 0 closed its pipe without a word: how did it end?
            raise rebuilt_error(*cancelled)
        if should_cancel is not None and should_cancel():
            cancel.set()
        ready: list[Any] = mp_connection.wait(open_readers, timeout=POLL_SECONDS) if open_readers else []
        if not ready:
            if not open_readers:  # every worker closed its pipe without a report
                for process in processes:
                    process.join(EXIT_GRACE_SECONDS)
                _check_alive(processes)
                raise WorkerFailed("the training workers exited without a result")
            _check_alive(processes)
            continue
        for reader in ready:
            try:
                kind, payload = reader.recv()
            except (EOFError, OSError):  # this worker exited: _check_alive tells how
                open_readers.remove(reader)
                continue
            if kind == "progress" and progress is not None:
                progress(payload)
            elif kind == "report":
                return payload  # type: ignore[no-any-return]
            elif kind == "error":
                if payload[0] == "Cancelled" and reader is not readers[0]:
                    if cancelled is None:
                        cancelled, flushed_by = payload, time.monotonic() + CHECKPOINT_FLUSH_SECONDS
                    continue
                for process in processes:  # a worker that died is the cause, not the others' timeouts
                    process.join(EXIT_GRACE_SECONDS)
                _check_alive(processes)
                others = [other for other in open_readers if other is not reader]
                raise rebuilt_error(*_cause(payload, others))


def _cause(first: ErrorPayload, others: list[Any]) -> ErrorPayload:
    """Of the errors the workers reported, the one that ended the run: a worker's own over the
    failed collectives its fault left the others in (whose word arrives first is a race)."""
    if first[0] != CollectiveFailed.__name__:
        return first
    for reader in others:
        try:
            while reader.poll():
                kind, payload = reader.recv()
                if kind == "error" and payload[0] != CollectiveFailed.__name__:
                    return payload  # type: ignore[no-any-return]
        except (EOFError, OSError):  # this worker's pipe is closed and read to the end
            continue
    return first


def _check_alive(processes: list[Any]) -> None:
    for rank, process in enumerate(processes):
        code = process.exitcode
        if code is not None and code != 0:
            for other in processes:
                if other.is_alive():
                    other.kill()
            how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
            raise WorkerFailed(
                f"training worker {rank} of {len(processes)} {how} before the run ended; the other "
                "workers were stopped (see the server log for the worker's output)"
            )


def _worker(rank: int, job: _WorkerJob, events: Any, cancel: Any) -> None:
    """One worker: join the group, train its shards, and report (worker 0) or fail; `events` is
    the writing end of this worker's pipe to the caller."""
    from o2u_engine.distributed import DistributedTrainer  # after spawn: torch is imported here

    _die_with_parent(job.parent)
    torch.set_num_threads(job.threads)
    device = "cpu" if job.gpu is None else f"cuda:{job.gpu + rank}"
    if job.gpu is not None:
        torch.cuda.set_device(device)
    dist.init_process_group(
        "gloo" if job.gpu is None else "nccl",
        init_method=f"file://{job.rendezvous}",
        rank=rank,
        world_size=job.world_size,
        timeout=timedelta(seconds=job.timeout_seconds),
    )
    try:
        report = score_noise(
            job.features,
            job.labels,
            device=device,
            progress=(lambda event: events.send(("progress", event))) if rank == 0 else None,
            should_cancel=cancel.is_set,
            _trainer=DistributedTrainer,
            **job.options,
        )
        if rank == 0:
            events.send(("report", report))
    except Exception as error:
        events.send(("error", error_payload(error)))
    finally:
        dist.destroy_process_group()
