"""`score_noise` in long-lived training processes (o2u_engine.process): the report of the calling
process score for score, one process serving call after call, engine errors raised again in the
caller with the process kept, and a process that dies or is abandoned replaced by a fresh one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from o2u_engine import Cancelled, DataValidationError, O2UConfig, ProgressEvent, score_noise
from o2u_engine.launch import SharedMemoryFull, WorkerFailed, shared_array, shared_tensor
from o2u_engine.process import TrainingError, TrainingProcesses
from tests.o2u_engine.engine_testing import flip_labels

SHORT = O2UConfig(seed=2, pretrain_epochs=2, cycle_length_epochs=2, num_cycles=2)
LONG = O2UConfig(seed=2, pretrain_epochs=2, cycle_length_epochs=2, num_cycles=200)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    features, labels = load_digits(return_X_y=True)
    noisy = flip_labels(labels.astype(np.int64), 10, 0.2, seed=0)
    return (features / 16.0).astype(np.float32), noisy


@pytest.fixture
def processes() -> Iterator[TrainingProcesses]:
    pool = TrainingProcesses(threads=1)
    pool.start(["cpu"])
    yield pool
    pool.close()


def test_a_call_returns_the_report_of_the_calling_process(
    processes: TrainingProcesses, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    features, labels = digits
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        here: list[ProgressEvent] = []
        expected = score_noise(features, labels, config=SHORT, progress=here.append)
    finally:
        torch.set_num_threads(threads)
    (started,) = processes.pids()
    for _ in range(2):
        there: list[ProgressEvent] = []
        report = processes.score_noise(features, labels, config=SHORT, progress=there.append)
        np.testing.assert_array_equal(report.noise_scores, expected.noise_scores)
        np.testing.assert_array_equal(report.suggested_labels, expected.suggested_labels)
        assert report.estimated_noise_rate == expected.estimated_noise_rate
        assert [(e.stage, e.epoch) for e in there] == [(e.stage, e.epoch) for e in here]
        assert processes.pids() == [started]  # the same process serves every call


def _host_memory_runs_out(stage: str, batch_size: int) -> None:
    """A fault hook (run in the training process): an allocation on the host fails."""
    raise MemoryError("injected host allocation failure")


def test_engine_errors_come_back_as_themselves_and_keep_the_process(
    processes: TrainingProcesses, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    features, labels = digits
    (started,) = processes.pids()
    with pytest.raises(Cancelled):
        processes.score_noise(features, labels, config=LONG, should_cancel=lambda: True)
    bad = labels.copy()
    bad[7] = 99
    with pytest.raises(DataValidationError) as invalid:
        processes.score_noise(features, bad, config=SHORT, num_classes=10)
    assert (invalid.value.field, invalid.value.index) == ("labels", 7)
    with pytest.raises(TrainingError, match=r"^TypeError: .*unexpected keyword argument 'bogus'"):
        processes.score_noise(features, labels, config=SHORT, bogus=1)
    # as in the calling process: the job fails as out of memory, not as an internal error
    with pytest.raises(MemoryError, match=r"^injected host allocation failure$"):
        processes.score_noise(features, labels, config=SHORT, _fault_hook=_host_memory_runs_out)
    assert processes.pids() == [started]
    processes.score_noise(features, labels, config=SHORT)
    assert processes.pids() == [started]


def test_interrupts_are_left_to_the_caller(
    processes: TrainingProcesses, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    """A Ctrl-C reaches the whole process group: the training process leaves it to the caller."""
    features, labels = digits
    processes.score_noise(features, labels, config=SHORT)  # the process is up and serving
    (started,) = processes.pids()
    os.kill(started, signal.SIGINT)
    os.kill(started, signal.SIGTERM)
    processes.score_noise(features, labels, config=SHORT)
    assert processes.pids() == [started]


def test_a_killed_process_fails_the_call_and_the_next_call_gets_a_fresh_one(
    processes: TrainingProcesses, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    features, labels = digits
    (started,) = processes.pids()

    def kill_after_an_epoch(event: ProgressEvent) -> None:
        if event.stage == "cyclic":
            os.kill(started, signal.SIGKILL)

    killed = "the training process was killed by signal 9 before the run ended"
    with pytest.raises(WorkerFailed, match=killed):
        processes.score_noise(features, labels, config=LONG, progress=kill_after_an_epoch)
    assert processes.pids() == []
    processes.score_noise(features, labels, config=SHORT)
    (fresh,) = processes.pids()
    assert fresh != started


class _LeaseGone(Exception):
    pass


def test_a_caller_that_stops_listening_stops_the_process(
    processes: TrainingProcesses, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    features, labels = digits
    (started,) = processes.pids()

    def give_up(event: ProgressEvent) -> None:
        raise _LeaseGone("another replica owns the job now")

    with pytest.raises(_LeaseGone):
        processes.score_noise(features, labels, config=LONG, progress=give_up)
    assert processes.pids() == []
    with pytest.raises(ProcessLookupError):  # stopped, not left training
        os.kill(started, 0)


def test_concurrent_calls_get_a_process_each(
    processes: TrainingProcesses, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    features, labels = digits
    reports: list[np.ndarray] = []

    def call() -> None:
        reports.append(processes.score_noise(features, labels, config=SHORT).noise_scores)

    callers = [threading.Thread(target=call) for _ in range(2)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert len(reports) == 2
    np.testing.assert_array_equal(reports[0], reports[1])
    assert len(processes.pids()) == 2  # both kept for the next calls
    processes.close()
    assert processes.pids() == []


def test_samples_that_shared_memory_cannot_hold_fail_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    def full(self: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("unable to write to file </torch_1_2>: No space left on device (28)")

    monkeypatch.setattr(torch.Tensor, "share_memory_", full)
    cause = r"could not place 256 bytes of samples in shared memory \(/dev/shm\)"
    with pytest.raises(SharedMemoryFull, match=cause) as caught:
        shared_tensor(np.zeros((8, 8), dtype=np.float32))
    assert caught.value.nbytes == 256
    assert isinstance(caught.value, WorkerFailed)  # what callers of the engine catch


def test_samples_already_in_shared_memory_are_not_copied_again() -> None:
    shared = shared_tensor(np.arange(12, dtype=np.float32).reshape(3, 4))
    assert shared.is_shared()
    assert shared_tensor(shared) is shared
    labels = shared_tensor(np.arange(3))
    assert shared_tensor(labels, torch.int64) is labels
    assert shared_tensor(labels, torch.int32).dtype == torch.int32  # another dtype is a new tensor
    private = torch.zeros(4)
    assert not private.is_shared()
    assert shared_tensor(private) is private
    assert private.is_shared()


def test_an_array_of_shared_array_is_shared_as_it_lies() -> None:
    """What a loader decodes into shared memory reaches the training processes without a copy: the
    array itself, a row range of it or its transpose (a Fortran-ordered .npz) is a tensor over the
    same memory."""
    values = shared_array((5, 4), np.dtype(np.float32))
    values[:] = np.arange(20, dtype=np.float32).reshape(5, 4)
    for view in (values, values[2:], values.T):
        tensor = shared_tensor(view)
        assert tensor.is_shared()
        assert tensor.data_ptr() == view.ctypes.data
        assert tensor.stride() == tuple(step // 4 for step in view.strides)
        np.testing.assert_array_equal(tensor.numpy(), view)
    assert shared_tensor(np.arange(20, dtype=np.float32)).data_ptr() != values.ctypes.data


def test_shared_array_fails_clearly_when_shared_memory_is_full(monkeypatch: pytest.MonkeyPatch) -> None:
    def full(self: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("unable to write to file </torch_1_3>: No space left on device (28)")

    monkeypatch.setattr(torch.Tensor, "share_memory_", full)
    with pytest.raises(SharedMemoryFull, match=r"could not place 1,200 bytes of samples") as caught:
        shared_array((10, 30), np.dtype(np.float32))
    assert caught.value.nbytes == 1200


def test_big_endian_samples_become_native_tensors() -> None:
    """torch has no big-endian dtype; the values arrive converted, not as an error."""
    values = np.arange(6, dtype=">f4").reshape(2, 3)
    tensor = shared_tensor(values)
    assert tensor.is_shared()
    assert tensor.dtype == torch.float32
    np.testing.assert_array_equal(tensor.numpy(), values)
    in_shared_memory = shared_array((2, 3), np.dtype(">i8"))
    in_shared_memory[:] = values
    assert shared_tensor(in_shared_memory).tolist() == [[0, 1, 2], [3, 4, 5]]


def test_a_read_only_array_goes_to_shared_memory_without_a_warning() -> None:
    """A memory-mapped dataset is read-only; torch warns once per process about wrapping such an
    array ("undefined behavior"), which would land in the server's log. In a fresh interpreter, so
    that an earlier test cannot have used up the warning."""
    program = (
        "import numpy as np\n"
        "from o2u_engine.launch import shared_tensor\n"
        "values = np.frombuffer(bytes(range(64)), dtype=np.uint8).reshape(4, 16)\n"
        "tensor = shared_tensor(values)\n"
        "assert tensor.is_shared() and tensor.numpy().tobytes() == bytes(range(64))\n"
    )
    subprocess.run([sys.executable, "-W", "error", "-c", program], check=True, timeout=120)
