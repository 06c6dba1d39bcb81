"""Data-parallel training over 2 gloo workers on the CPU: the scores agree with one worker's,
repeat exactly for the same world size, resume bit-identically from a checkpoint (never from
another world size's), an out-of-memory error on one worker halves the batch on both, and a cancel
or a killed worker ends the run cleanly instead of hanging it."""

from __future__ import annotations

import dataclasses
import itertools
import multiprocessing
import os
import signal
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score

from o2u_engine import Cancelled, ConfigError, DataValidationError, NoiseReport, O2UConfig, launch
from o2u_engine.distributed import CollectiveFailed, shard_bounds
from o2u_engine.launch import (
    TrainingError,
    WorkerFailed,
    _supervise,
    error_payload,
    rebuilt_error,
    score_noise_workers,
)
from tests.o2u_engine import fake_workers
from tests.o2u_engine.engine_testing import flip_labels

CONFIG = O2UConfig(seed=0, model="small_cnn", pretrain_epochs=2, cycle_length_epochs=2, num_cycles=1)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    features, true_labels = load_digits(return_X_y=True)
    images = features.reshape(-1, 8, 8).astype(np.float32)
    return images, flip_labels(true_labels, 10, 0.2, seed=0), true_labels


@pytest.fixture(scope="module")
def two_workers(digits: tuple[np.ndarray, np.ndarray, np.ndarray]) -> NoiseReport:
    """An uninterrupted 2-worker run of CONFIG, which several tests compare against."""
    images, labels, _ = digits
    return score_noise_workers(images, labels, world_size=2, config=CONFIG, num_classes=10)


def test_shards_cover_the_batch_once() -> None:
    for size in (1, 2, 7, 64):
        bounds = [shard_bounds(size, rank, 3) for rank in range(3)]
        assert bounds[0][0] == 0
        assert bounds[-1][1] == size
        assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))


def test_two_workers_match_one_and_repeat(
    digits: tuple[np.ndarray, np.ndarray, np.ndarray], two_workers: NoiseReport
) -> None:
    images, labels, true_labels = digits
    one = score_noise_workers(images, labels, world_size=1, config=CONFIG, num_classes=10)
    two = two_workers
    again = score_noise_workers(images, labels, world_size=2, config=CONFIG, num_classes=10)
    noisy = labels != true_labels
    auroc_one = roc_auc_score(noisy, one.noise_scores)
    auroc_two = roc_auc_score(noisy, two.noise_scores)
    assert auroc_two > 0.9
    assert abs(auroc_one - auroc_two) < 0.01
    np.testing.assert_array_equal(two.noise_scores, again.noise_scores)
    assert not np.array_equal(one.noise_scores, two.noise_scores)  # really two workers


def test_resume_gives_the_uninterrupted_scores(
    digits: tuple[np.ndarray, np.ndarray, np.ndarray], two_workers: NoiseReport, tmp_path: Path
) -> None:
    images, labels, _ = digits
    path = tmp_path / "run.pt"
    seen: list[int] = []

    def stop_in_cyclic() -> bool:
        return len(seen) >= 3  # after stage 1 and the first cyclic epoch

    with pytest.raises(Cancelled):
        score_noise_workers(
            images,
            labels,
            world_size=2,
            config=CONFIG,
            num_classes=10,
            checkpoint_path=path,
            progress=lambda event: seen.append(event.epoch),
            should_cancel=stop_in_cyclic,
        )
    assert path.exists()
    assert len(seen) == 3
    with pytest.raises(ConfigError, match="different run") as refused:  # another world size
        score_noise_workers(images, labels, world_size=1, config=CONFIG, num_classes=10, checkpoint_path=path)
    assert refused.value.field == "checkpoint_path"
    resumed_events: list[str] = []
    resumed = score_noise_workers(
        images,
        labels,
        world_size=2,
        config=CONFIG,
        num_classes=10,
        checkpoint_path=path,
        progress=lambda event: resumed_events.append(event.stage),
    )
    assert resumed_events == ["cyclic"]  # only the last cyclic epoch ran again
    np.testing.assert_array_equal(resumed.noise_scores, two_workers.noise_scores)


def test_a_killed_worker_fails_the_run(
    digits: tuple[np.ndarray, np.ndarray, np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images, labels, _ = digits
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the workers' file store goes
    events: list[int] = []
    killed: list[int] = []
    stores: list[Path] = []
    names: list[str] = []

    def kill_worker_1_after_first_epoch() -> bool:  # polled by the caller's thread
        workers = multiprocessing.active_children()
        if events and not killed and len(workers) == 2:
            stores.extend(tmp_path.glob("o2u-rendezvous-*/store"))
            names.extend(sorted(worker.name for worker in workers))
            killed.append(max(worker.pid for worker in workers if worker.pid is not None))
            os.kill(killed[0], signal.SIGKILL)
        return False

    with pytest.raises(WorkerFailed, match="killed by signal 9"):
        score_noise_workers(
            images,
            labels,
            world_size=2,
            config=CONFIG,
            num_classes=10,
            progress=lambda event: events.append(event.epoch),
            should_cancel=kill_worker_1_after_first_epoch,
        )
    assert killed
    assert names == ["o2u-worker-0", "o2u-worker-1"]  # told apart from the caller's other children
    assert multiprocessing.active_children() == []
    assert stores, "the workers met through a file store in a folder of their own"
    assert list(tmp_path.glob("o2u-rendezvous-*")) == [], "the rendezvous store outlived the run"


def test_a_worker_that_cannot_be_started_stops_the_ones_already_started(
    digits: tuple[np.ndarray, np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Starting worker 1 fails (no memory or processes left): worker 0, already started and waiting
    for it, must not be left running on its own."""
    images, labels, _ = digits
    start = multiprocessing.get_context("spawn").Process.start
    starts: list[int] = []

    def start_all_but_the_second(process: Any) -> None:
        starts.append(1)
        if len(starts) == 2:
            raise OSError(12, "Cannot allocate memory")
        start(process)

    monkeypatch.setattr(multiprocessing.get_context("spawn").Process, "start", start_all_but_the_second)
    with pytest.raises(OSError, match="Cannot allocate memory"):
        score_noise_workers(images, labels, world_size=2, config=CONFIG, num_classes=10)
    assert multiprocessing.active_children() == [], "worker 0 was stopped"


def test_a_worker_killed_in_the_middle_of_a_message_fails_the_run_instead_of_hanging_it() -> None:
    context = multiprocessing.get_context("spawn")
    reader, writer = context.Pipe(duplex=False)
    worker = context.Process(target=fake_workers.die_in_the_middle_of_a_message, args=(writer,), daemon=True)
    worker.start()
    writer.close()
    try:
        with pytest.raises(WorkerFailed, match="training worker 0 of 1 was killed by signal 9"):
            _supervise([worker], [reader], context.Event(), None, None)
    finally:
        worker.join()
        reader.close()


@pytest.mark.parametrize(
    ("peer", "expected", "message"),
    [
        (fake_workers.fault_of_its_own_after_a_while, TrainingError, r"^KeyError: 'weights'$"),
        (fake_workers.hung, WorkerFailed, r"^worker 0 of 2: a collective failed \(peer closed\)$"),
    ],
    ids=["a peer's own fault", "a hung peer"],
)
def test_a_failed_collective_is_blamed_on_its_cause(
    monkeypatch: pytest.MonkeyPatch, peer: Any, expected: type[Exception], message: str
) -> None:
    """Worker 0's failed collective arrives first; the run ends with the peer's own exception (a
    fault another attempt repeats: the job fails), or as a worker failure (retried) when the peer
    has nothing to say, having hung."""
    monkeypatch.setattr(launch, "EXIT_GRACE_SECONDS", 2.0)
    context = multiprocessing.get_context("spawn")
    pipes = [context.Pipe(duplex=False) for _ in range(2)]
    workers = [
        context.Process(target=target, args=(writer,), daemon=True)
        for target, (_, writer) in zip([fake_workers.collective_failed, peer], pipes, strict=True)
    ]
    for worker, (_, writer) in zip(workers, pipes, strict=True):
        worker.start()
        writer.close()
    try:
        with pytest.raises(expected, match=message):
            _supervise(workers, [reader for reader, _ in pipes], context.Event(), None, None)
    finally:
        for worker in workers:
            worker.kill()
            worker.join()
        for reader, _ in pipes:
            reader.close()


def _bug_on_worker_1(stage: str, batch_size: int) -> None:
    """A fault hook (run in the workers): worker 1 alone meets a bug of its own at its first step."""
    if dist.get_rank() == 1:
        raise ValueError("injected fault on worker 1")


def test_a_fault_of_one_worker_fails_the_run_as_itself(
    digits: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    """Not as a worker failure to retry: with one worker the same fault is a TrainingError too,
    and worker 0's collective that it broke is not the cause."""
    images, labels, _ = digits
    with pytest.raises(TrainingError, match=r"^ValueError: injected fault on worker 1$"):
        score_noise_workers(
            images, labels, world_size=2, config=CONFIG, num_classes=10, _fault_hook=_bug_on_worker_1
        )
    assert multiprocessing.active_children() == []


def test_an_engine_error_crosses_the_pipe_with_its_field_and_index(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """What a worker sends for an exception (`error_payload`) is raised in the caller as it was;
    only a fault of the process's own leaves its traceback behind, in its standard error."""
    invalid = rebuilt_error(*error_payload(DataValidationError("labels: bad", field="labels", index=41)))
    assert isinstance(invalid, DataValidationError)
    assert (str(invalid), invalid.field, invalid.index) == ("labels: bad", "labels", 41)
    config = rebuilt_error(*error_payload(ConfigError("lr: too high", field="lr")))
    assert (type(config), config.field) == (ConfigError, "lr")  # type: ignore[attr-defined]
    assert type(rebuilt_error(*error_payload(MemoryError("no room")))) is MemoryError
    assert type(rebuilt_error(*error_payload(CollectiveFailed("peer gone")))) is WorkerFailed
    assert capsys.readouterr().err == ""
    with pytest.raises(KeyError) as raised:
        {}["weights"]
    assert str(rebuilt_error(*error_payload(raised.value))) == "KeyError: 'weights'"
    printed = capsys.readouterr().err
    assert printed.startswith("Traceback (most recent call last):")
    assert printed.rstrip().endswith("KeyError: 'weights'")


def test_a_cancel_waits_for_worker_0_to_write_its_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every worker stops at the same batch; worker 0 saves the epoch boundary before it says so.
    The others' word must not end the run (and kill worker 0 in the middle of its write)."""
    monkeypatch.setattr(launch, "EXIT_GRACE_SECONDS", 0.5)
    context = multiprocessing.get_context("spawn")
    checkpoint = tmp_path / "checkpoint"
    pipes = [context.Pipe(duplex=False) for _ in range(2)]
    workers = [
        context.Process(
            target=fake_workers.cancelled_after_its_checkpoint,
            args=(pipes[0][1], str(checkpoint)),
            daemon=True,
        ),
        context.Process(target=fake_workers.cancelled_at_once, args=(pipes[1][1],), daemon=True),
    ]
    for worker, (_, writer) in zip(workers, pipes, strict=True):
        worker.start()
        writer.close()
    try:
        with pytest.raises(Cancelled, match="cancelled during cyclic epoch 1"):
            _supervise(workers, [reader for reader, _ in pipes], context.Event(), None, None)
        assert checkpoint.read_text() == "epoch 3", "worker 0 finished writing before the run ended"
    finally:
        for worker in workers:
            worker.join()
        for reader, _ in pipes:
            reader.close()


def test_an_unusable_temporary_directory_fails_the_run_clearly(
    digits: tuple[np.ndarray, np.ndarray, np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images, labels, _ = digits
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "gone"))
    with pytest.raises(
        WorkerFailed, match=r"rendezvous folder .* No such file or directory; it must be writable"
    ):
        score_noise_workers(images, labels, world_size=2, config=CONFIG, num_classes=10)
    assert multiprocessing.active_children() == []


def _oom_on_worker_1(stage: str, batch_size: int) -> None:
    """A fault hook (run in the workers): worker 1 alone runs out of memory at stage 2's batch size,
    before it augments the batch (the other worker has augmented it by the time they agree)."""
    if dist.get_rank() == 1 and stage == "cyclic" and batch_size > CONFIG_OOM_BATCH // 2:
        raise torch.OutOfMemoryError("injected on worker 1")


def _oom_on_every_worker(stage: str, batch_size: int) -> None:
    """The same, on every worker."""
    if stage == "cyclic" and batch_size > CONFIG_OOM_BATCH // 2:
        raise torch.OutOfMemoryError("injected on every worker")


CONFIG_OOM_BATCH = 128


def test_out_of_memory_on_one_worker_halves_the_batch_on_all(
    digits: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    images, labels, true_labels = digits
    config = dataclasses.replace(CONFIG, cyclic_batch_size=CONFIG_OOM_BATCH)
    report = score_noise_workers(
        images, labels, world_size=2, config=config, num_classes=10, _fault_hook=_oom_on_worker_1
    )
    assert roc_auc_score(labels != true_labels, report.noise_scores) > 0.9
    # Stage 2 can only have finished at half the batch; and which worker ran out does not matter:
    # every worker goes on from the state before the step (worker 0 had augmented the batch).
    everywhere = score_noise_workers(
        images, labels, world_size=2, config=config, num_classes=10, _fault_hook=_oom_on_every_worker
    )
    np.testing.assert_array_equal(report.noise_scores, everywhere.noise_scores)


def _host_memory_runs_out(stage: str, batch_size: int) -> None:
    """A fault hook (run in the workers): an allocation on the host fails on every worker."""
    raise MemoryError("injected host allocation failure")


def test_host_memory_running_out_in_the_workers_is_memory_not_a_crash(
    digits: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    """As with one worker: the job fails as out of memory, not as a worker crash to retry."""
    images, labels, _ = digits
    with pytest.raises(MemoryError, match="injected host allocation failure"):
        score_noise_workers(
            images, labels, world_size=2, config=CONFIG, num_classes=10, _fault_hook=_host_memory_runs_out
        )
    assert multiprocessing.active_children() == []


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_two_gpus_match_one(digits: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    images, labels, true_labels = digits
    one = score_noise_workers(images, labels, world_size=1, device="cuda:0", config=CONFIG, num_classes=10)
    two = score_noise_workers(images, labels, world_size=2, device="cuda:0", config=CONFIG, num_classes=10)
    noisy = labels != true_labels
    assert abs(roc_auc_score(noisy, one.noise_scores) - roc_auc_score(noisy, two.noise_scores)) < 0.01
