"""The boundary between the server and the engine (jobs/engine.py), with a real training run: requested
fields in, domain progress, score rows, summary and one serialization of the resolved config out."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import o2u_engine
from o2u_engine import ConfigError, DataValidationError, DeviceOutOfMemory, O2UConfig
from o2u_engine.launch import SharedMemoryFull, shared_array
from o2u_engine.process import TrainingError
from o2u_server.datasets import LoadedDataset
from o2u_server.domain import Progress, Stage
from o2u_server.errors import Code, Internal, InvalidArgument, NotFound
from o2u_server.jobs.engine import (
    Engine,
    TrainingProcesses,
    engine_config,
    job_results,
    run_info,
    service_error,
)
from tests.server_testing import TINY_CONFIG


@pytest.fixture(scope="module")
def blobs() -> LoadedDataset:
    """Three separated blobs in 8-d, the first 6 of 90 labels moved to the next class."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 30).astype(np.int64)
    features = (rng.normal(0.0, 4.0, size=(3, 8))[labels] + rng.normal(size=(90, 8))).astype(np.float32)
    labels[:6] = (labels[:6] + 1) % 3
    keys = [f"sample-{i}" for i in range(90)]
    return LoadedDataset(features, labels, keys, ["ant", "bee", "cat"], bytes_read=0, source="file")


def test_requested_fields_are_validated_naming_the_field() -> None:
    assert engine_config({"model": "mlp", "seed": 3}) == O2UConfig(model="mlp", seed=3)
    with pytest.raises(InvalidArgument) as caught:
        engine_config({"pretrain_epochs": -1})
    assert caught.value.field == "config.pretrain_epochs"
    with pytest.raises(InvalidArgument) as caught:
        engine_config({"no_such_field": 1})
    assert caught.value.field == "config"


def test_a_run_crosses_the_boundary_in_domain_types(blobs: LoadedDataset, tmp_path: Path) -> None:
    engine = Engine()
    config = engine.resolve(TINY_CONFIG, blobs, "cpu")
    planned = run_info(config, device="cpu", num_samples=90, num_classes=3, server_version="9.9")
    events: list[Progress] = []
    report = engine.score(
        blobs,
        config,
        device="cpu",
        progress=events.append,
        should_cancel=lambda: False,
        checkpoint_path=tmp_path / "job.pt",
        checkpoint_interval_seconds=0.0,
        initial_weights=None,
    )
    assert [(event.stage, event.epoch) for event in events] == [
        (Stage.PRETRAINING, 1),
        (Stage.PRETRAINING, 2),
        (Stage.CYCLIC, 1),
        (Stage.CYCLIC, 2),
    ]
    results = job_results(report, blobs, job_id="job-1", server_version="9.9")

    # One serialization of the resolved config, before training and in the result.
    assert results.run_info == planned
    assert json.loads(planned.resolved_config_json) == config.to_dict()
    assert O2UConfig.from_dict(config.to_dict()).to_json() == planned.resolved_config_json
    assert (planned.model, planned.seed, planned.engine_version) == ("mlp", 0, o2u_engine.__version__)

    rows = list(results.scores)
    assert [row[0] for row in rows] == list(range(1, 91))  # ranks, most suspicious first
    assert {row[2] for row in rows[:6]} == {f"sample-{i}" for i in range(6)}  # the flipped keys lead
    summary = results.summary
    assert (summary.job_id, summary.num_samples, summary.class_names) == ("job-1", 90, ["ant", "bee", "cat"])
    assert [noise.name for noise in summary.classes] == ["ant", "bee", "cat"]
    assert len(summary.transition_matrix) == 9
    assert summary.run_info == results.run_info


def test_engine_errors_become_service_errors() -> None:
    memory = service_error(DeviceOutOfMemory("CUDA out of memory"))
    assert (memory.code, memory.reason) == (Code.RESOURCE_EXHAUSTED, "DEVICE_OUT_OF_MEMORY")
    assert "pretrain_batch_size" in memory.message
    data = service_error(DataValidationError("labels: expected (N,)", field="labels"))
    assert (data.code, data.reason, data.field) == (Code.INVALID_ARGUMENT, "INVALID_DATASET", "dataset")
    config = service_error(ConfigError("image_size: too small", field="image_size"))
    assert (config.code, config.reason, config.field) == (Code.INVALID_ARGUMENT, "INVALID_CONFIG", "config")
    shm = service_error(SharedMemoryFull("could not place ... </torch_1_2>: No space left on device", 4096))
    assert (shm.code, shm.reason) == (Code.RESOURCE_EXHAUSTED, "SHARED_MEMORY_FULL")
    assert "4,096 bytes" in shm.message
    assert "shm.sizeLimit" in shm.message
    assert "torch_" not in shm.message
    host = service_error(MemoryError("Unable to allocate 74.5 GiB for an array"))
    assert (host.code, host.reason) == (Code.RESOURCE_EXHAUSTED, "OUT_OF_MEMORY")
    assert "74.5 GiB" in host.message
    assert "max_decoded_bytes" in host.message
    assert "(an allocation failed)" in service_error(MemoryError()).message
    missing = NotFound("gone", reason="OBJECT_NOT_FOUND")
    assert service_error(missing) is missing
    unexpected = service_error(KeyError("x"))
    assert isinstance(unexpected, Internal)
    assert "KeyError" in unexpected.message
    # the same error raised in a training process reads as it does from the server's thread
    remote = service_error(TrainingError("KeyError: 'x'"))
    assert (remote.code, remote.reason, remote.message) == (Code.INTERNAL, "INTERNAL", unexpected.message)


def test_enum_fields_become_the_engine_values_and_the_legacy_switch_means_a_crop() -> None:
    assert engine_config({"augmentation": 3, "score": 1}) == O2UConfig(augment="crop_flip", score="o2u_loss")
    assert engine_config({"score": 3}) == O2UConfig(score="loss_margin")
    assert engine_config({"augment": True}).augment is True  # resolved to "crop", never a flip
    assert engine_config({"augment": True, "augmentation": 2}).augment == "crop"
    with pytest.raises(InvalidArgument) as conflict:
        engine_config({"augment": True, "augmentation": 3})
    assert (conflict.value.code, conflict.value.field) == (Code.INVALID_ARGUMENT, "config.augmentation")
    with pytest.raises(InvalidArgument) as unknown:
        engine_config({"score": 5})
    assert unknown.value.field == "config.score"


def _copy(dataset: LoadedDataset) -> LoadedDataset:
    return dataclasses.replace(dataset, features=dataset.features.copy(), labels=dataset.labels.copy())


def _samples_received(
    engine_for: Callable[..., Engine], dataset: LoadedDataset, tmp_path: Path
) -> tuple[Any, Any]:
    """Score `dataset` with `engine_for(score_noise=...)`; the features and labels score_noise got."""
    received: list[tuple[Any, Any]] = []

    def score_noise(features: Any, labels: Any, **options: Any) -> o2u_engine.NoiseReport:
        received.append((features, labels))
        return o2u_engine.score_noise(features, labels, **options)

    engine = engine_for(score_noise=score_noise)
    engine.score(
        dataset,
        engine.resolve(TINY_CONFIG, dataset, "cpu"),
        device="cpu",
        progress=lambda _: None,
        should_cancel=lambda: False,
        checkpoint_path=tmp_path / "job.pt",
        checkpoint_interval_seconds=0.0,
        initial_weights=None,
    )
    [samples] = received
    return samples


@pytest.mark.parametrize(
    "engine_for",
    [
        partial(Engine, world_size=2),  # data-parallel workers
        partial(Engine, processes=TrainingProcesses()),  # the training process (never started: not called)
    ],
    ids=["workers", "process"],
)
def test_samples_for_other_processes_are_held_once_in_shared_memory(
    engine_for: Callable[..., Engine], blobs: LoadedDataset, tmp_path: Path
) -> None:
    """Data-parallel workers and the training process read the samples from shared memory: the
    dataset is moved there before the call and keeps views of it, not a private copy beside it."""
    assert engine_for().trains_elsewhere
    dataset = _copy(blobs)
    loaded = dataset.features
    features, labels = _samples_received(engine_for, dataset, tmp_path)
    assert isinstance(features, torch.Tensor)
    assert features.is_shared()
    assert isinstance(labels, torch.Tensor)
    assert labels.is_shared()
    assert labels.dtype == torch.int64
    assert np.shares_memory(dataset.features, features.numpy())  # the dataset's array is the shared one
    assert np.shares_memory(dataset.labels, labels.numpy())
    assert not np.shares_memory(dataset.features, loaded)  # ... and no longer the loader's
    np.testing.assert_array_equal(dataset.features, blobs.features)
    np.testing.assert_array_equal(dataset.labels, blobs.labels)


@pytest.mark.parametrize(
    "engine_for",
    [partial(Engine, world_size=2), partial(Engine, processes=TrainingProcesses())],
    ids=["workers", "process"],
)
def test_samples_decoded_into_shared_memory_are_not_moved(
    engine_for: Callable[..., Engine], blobs: LoadedDataset, tmp_path: Path
) -> None:
    """A job that trains in other processes has its loader decode into shared memory
    (`Engine.allocate`), so the samples reach score_noise where the loader put them: the server
    never holds a second copy, not even for the moment of a move."""
    engine = engine_for()
    assert engine.allocate is shared_array
    decoded = engine.allocate(blobs.features.shape, blobs.features.dtype)
    decoded[:] = blobs.features
    dataset = dataclasses.replace(blobs, features=decoded, labels=blobs.labels.copy())
    features, _ = _samples_received(engine_for, dataset, tmp_path)
    assert features.data_ptr() == decoded.ctypes.data
    np.testing.assert_array_equal(dataset.features, blobs.features)


def test_samples_trained_in_the_servers_thread_stay_where_they_are(
    blobs: LoadedDataset, tmp_path: Path
) -> None:
    assert not Engine().trains_elsewhere
    assert Engine().allocate is np.empty  # the loader's own array
    dataset = _copy(blobs)
    features, labels = dataset.features, dataset.labels
    received = _samples_received(Engine, dataset, tmp_path)
    assert received[0] is features
    assert received[1] is labels
    assert dataset.features is features
    assert dataset.labels is labels
