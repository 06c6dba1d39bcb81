"""Training behaviour: determinism, progress, cancellation, out-of-memory recovery, placement,
precision, stage 3 and divergence."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from o2u_engine import (
    Cancelled,
    ConfigError,
    DeviceOutOfMemory,
    NoiseReport,
    O2UConfig,
    ProgressEvent,
    TrainingDiverged,
    build_model,
    score_noise,
)
from o2u_engine.data import validation_split
from tests.o2u_engine.engine_testing import FAST, NoisyDataset


def assert_same_report(first: NoiseReport, second: NoiseReport) -> None:
    assert np.array_equal(first.noise_scores, second.noise_scores)
    assert np.array_equal(first.score_variance, second.score_variance)
    assert np.array_equal(first.ranks, second.ranks)
    assert np.array_equal(first.suggested_labels, second.suggested_labels)
    assert np.array_equal(first.suggested_label_confidence, second.suggested_label_confidence)


def test_same_seed_same_ranking_other_seed_other_scores(blobs: NoisyDataset) -> None:
    first = score_noise(blobs.samples, blobs.labels, config=FAST)
    assert_same_report(first, score_noise(blobs.samples, blobs.labels, config=FAST))
    other = score_noise(blobs.samples, blobs.labels, config=dataclasses.replace(FAST, seed=1))
    assert not np.array_equal(first.noise_scores, other.noise_scores)


def test_report_shapes_and_provenance(blobs: NoisyDataset) -> None:
    report = score_noise(blobs.samples, blobs.labels, config=FAST)
    n, k = blobs.labels.shape[0], blobs.num_classes
    assert report.noise_scores.dtype == np.float64
    assert report.noise_scores.shape == (n,)
    assert np.all(np.isfinite(report.noise_scores))
    assert np.all(report.score_variance >= 0)
    assert sorted(report.ranks.tolist()) == list(range(1, n + 1))
    assert report.ranks.dtype == np.int64
    assert report.suggested_labels.dtype == np.int64
    assert report.order()[0] == int(np.argmax(report.noise_scores))
    assert report.suspected.sum() == round(report.noise_rate_used * n)
    assert report.transition_matrix.shape == (k, k)
    np.testing.assert_allclose(report.transition_matrix.sum(axis=1), 1.0)
    assert report.class_counts.sum() == n
    assert report.class_suspected.sum() == report.suspected.sum()
    assert (report.seed, report.device, report.engine_version) == (0, "cpu", "0.1.0")
    assert report.torch_version == torch.__version__
    assert report.config.model == "mlp"
    assert '"model": "mlp"' in report.config_json()
    assert {"preparation", "pretraining", "cyclic", "ranking", "total"} <= set(report.timings)
    assert report.clean_retraining is None
    # The flipped labels rank high even in this short run.
    assert blobs.is_noisy[report.order()[: blobs.is_noisy.sum()]].mean() >= 0.8


def test_progress_after_every_epoch(blobs: NoisyDataset) -> None:
    events: list[ProgressEvent] = []
    score_noise(blobs.samples, blobs.labels, config=FAST, progress=events.append)
    assert [(e.stage, e.epoch, e.epochs_total) for e in events] == [
        ("pretraining", 1, 3), ("pretraining", 2, 3), ("pretraining", 3, 3),
        ("cyclic", 1, 4), ("cyclic", 2, 4), ("cyclic", 3, 4), ("cyclic", 4, 4),
    ]  # fmt: skip
    assert [e.fraction_done for e in events] == pytest.approx([i / 7 for i in range(1, 8)])
    assert [e.learning_rate for e in events] == pytest.approx([0.01] * 3 + [0.0055, 0.001, 0.0055, 0.001])
    assert all(e.mean_loss > 0 and e.samples_per_second > 0 for e in events)
    assert events[-1].eta_seconds == 0.0
    assert events[0].eta_seconds > 0


class CancelAfter:
    """should_cancel that turns True after `polls` polls; counts the optimizer steps taken."""

    def __init__(self, polls: int) -> None:
        self.polls, self.calls, self.steps = polls, 0, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls > self.polls

    def count_step(self, stage: str, batch_size: int) -> None:
        self.steps += 1


def test_cancel_stops_within_one_batch(blobs: NoisyDataset) -> None:
    cancel = CancelAfter(polls=9)  # 7 batches per pretraining epoch: cancels in epoch 2
    with pytest.raises(Cancelled, match="pretraining epoch 2"):
        score_noise(
            blobs.samples, blobs.labels, config=FAST, should_cancel=cancel, _fault_hook=cancel.count_step
        )
    assert cancel.steps == 9  # the poll that said "cancel" was followed by no step


@pytest.mark.parametrize(
    ("dataset", "config", "polls", "where"),
    [
        ("blobs", FAST, 21, "cyclic epoch 1"),  # the first batch of stage 2 (a phase boundary)
        ("blobs", FAST, 40, "cyclic epoch 2"),
        (
            "tiny_images",
            dataclasses.replace(FAST, precision="fp32"),
            30,
            "cyclic epoch 4",
        ),  # augmentation draws
        (
            "blobs",
            dataclasses.replace(FAST, clean_retraining=True, class_aware_normalization=True),
            125,
            "retraining epoch 10",
        ),
    ],
)
def test_resumed_run_equals_an_uninterrupted_one(
    dataset: str, config: O2UConfig, polls: int, where: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    data: NoisyDataset = request.getfixturevalue(dataset)
    uninterrupted = score_noise(data.samples, data.labels, config=config)
    checkpoint = tmp_path / "run.ckpt"
    with pytest.raises(Cancelled, match=where):
        score_noise(
            data.samples,
            data.labels,
            config=config,
            checkpoint_path=checkpoint,
            should_cancel=CancelAfter(polls),
        )
    assert checkpoint.exists()
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left no temporary file behind
    events: list[ProgressEvent] = []
    resumed = score_noise(
        data.samples, data.labels, config=config, checkpoint_path=checkpoint, progress=events.append
    )
    assert events[0].fraction_done > 0.2  # it continued rather than started over
    assert_same_report(uninterrupted, resumed)
    assert resumed.clean_retraining == uninterrupted.clean_retraining
    if config.clean_retraining:  # cancelled while training stage 3's second model
        assert [e.epoch for e in events][:2] == [10, 11]


def test_a_checkpoint_of_another_run_is_refused(blobs: NoisyDataset, tmp_path: Path) -> None:
    checkpoint = tmp_path / "run.ckpt"
    with pytest.raises(Cancelled):
        score_noise(
            blobs.samples,
            blobs.labels,
            config=FAST,
            checkpoint_path=checkpoint,
            should_cancel=CancelAfter(10),
        )
    with pytest.raises(ConfigError, match=r"checkpoint_path: .* different run") as raised:
        score_noise(
            blobs.samples, blobs.labels, config=dataclasses.replace(FAST, seed=5), checkpoint_path=checkpoint
        )
    assert raised.value.field == "checkpoint_path"
    checkpoint.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="not a readable o2u checkpoint"):
        score_noise(blobs.samples, blobs.labels, config=FAST, checkpoint_path=checkpoint)


class OutOfMemoryInjector:
    """Raises torch.OutOfMemoryError on the first `failures` steps of `stage`; records batch sizes."""

    def __init__(self, stage: str, failures: int) -> None:
        self.stage, self.failures = stage, failures
        self.sizes: list[tuple[str, int]] = []

    def __call__(self, stage: str, batch_size: int) -> None:
        self.sizes.append((stage, batch_size))
        if stage == self.stage and self.failures > 0:
            self.failures -= 1
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")


def test_out_of_memory_halves_the_batch_size_and_finishes(blobs: NoisyDataset) -> None:
    injector = OutOfMemoryInjector("cyclic", failures=2)
    report = score_noise(blobs.samples, blobs.labels, config=FAST, _fault_hook=injector)
    cyclic_sizes = [size for stage, size in injector.sizes if stage == "cyclic"]
    assert cyclic_sizes[:3] == [16, 8, 4]  # the failing batch is retried at half size, twice
    assert max(cyclic_sizes[3:]) <= 4  # and the rest of the run keeps the smaller size
    assert np.all(np.isfinite(report.noise_scores))
    # Every sample still got exactly one loss per cyclic epoch.
    assert report.suggested_label_confidence.max() <= 1.0


def test_persistent_out_of_memory_raises(blobs: NoisyDataset) -> None:
    injector = OutOfMemoryInjector("pretraining", failures=100)
    with pytest.raises(DeviceOutOfMemory, match="after halving it 3 times"):
        score_noise(blobs.samples, blobs.labels, config=FAST, _fault_hook=injector)
    assert [size for _, size in injector.sizes] == [29, 16, 8, 4]  # 200 samples in 7 batches of <= 32


@pytest.mark.parametrize("dataset", ["blobs", "tiny_images"])
def test_streamed_equals_resident(dataset: str, request: pytest.FixtureRequest) -> None:
    data: NoisyDataset = request.getfixturevalue(dataset)
    config = dataclasses.replace(FAST, precision="fp32", image_size=12 if dataset == "tiny_images" else None)
    resident = score_noise(
        data.samples, data.labels, config=dataclasses.replace(config, data_placement="resident")
    )
    streamed_config = dataclasses.replace(config, data_placement="streamed", stream_chunk_samples=40)
    streamed = score_noise(data.samples, data.labels, config=streamed_config)
    assert streamed.config.data_placement == "streamed"
    assert_same_report(resident, streamed)


def test_bf16_ranking_is_close_to_fp32(tiny_images: NoisyDataset) -> None:
    runs = {
        precision: score_noise(
            tiny_images.samples, tiny_images.labels, config=dataclasses.replace(FAST, precision=precision)
        )
        for precision in ("fp32", "bf16")
    }
    fp32, bf16 = runs["fp32"].noise_scores, runs["bf16"].noise_scores
    correlation = np.corrcoef(np.argsort(np.argsort(fp32)), np.argsort(np.argsort(bf16)))[0, 1]
    assert correlation > 0.9  # Spearman rank correlation
    k = int(tiny_images.is_noisy.sum())
    overlap = np.intersect1d(runs["fp32"].order()[:k], runs["bf16"].order()[:k]).size / k
    assert overlap >= 0.7


def test_a_compiled_model_scores_like_the_eager_one(
    blobs: NoisyDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.compile (here with the CUDA-graph mode, which a CPU runs without graphs) changes speed,
    not the ranking."""
    modes: list[str] = []
    real_compile = torch.compile

    def recording_compile(model: torch.nn.Module, *, mode: str) -> object:
        modes.append(mode)
        return real_compile(model, mode=mode)

    monkeypatch.setattr(torch, "compile", recording_compile)
    config = dataclasses.replace(FAST, precision="fp32")
    eager = score_noise(blobs.samples, blobs.labels, config=config)
    assert modes == []
    compiled = score_noise(
        blobs.samples,
        blobs.labels,
        config=dataclasses.replace(config, compile_model=True, compile_mode="reduce-overhead"),
    )
    assert (compiled.config.compile_model, compiled.config.compile_mode) == (True, "reduce-overhead")
    assert modes == ["reduce-overhead", "reduce-overhead"]  # stage 1 and stage 2
    correlation = np.corrcoef(
        np.argsort(np.argsort(eager.noise_scores)), np.argsort(np.argsort(compiled.noise_scores))
    )
    assert correlation[0, 1] > 0.99
    np.testing.assert_array_equal(compiled.suggested_labels, eager.suggested_labels)


def test_clean_retraining_reports_both_accuracies(blobs: NoisyDataset) -> None:
    config = dataclasses.replace(FAST, clean_retraining=True)
    events: list[ProgressEvent] = []
    report = score_noise(blobs.samples, blobs.labels, config=config, progress=events.append)
    result = report.clean_retraining
    assert result is not None
    assert report.config.validation_fraction == 0.1
    assert 0.0 <= result.accuracy_without_removal <= 1.0
    assert result.accuracy_with_removal >= 0.8  # the blobs are easy once the wrong labels are gone
    split = validation_split(len(blobs.labels), report.config.validation_fraction, report.config.seed)
    assert result.removed == report.suspected[split.train].sum() > 0  # exactly the report's suspects
    assert 0 < result.validation_samples <= 20
    stage3 = [e for e in events if e.stage == "clean_retraining"]
    assert [e.epoch for e in stage3] == list(range(1, 15))
    assert stage3[0].epochs_total == 14
    assert events[-1].fraction_done == pytest.approx(1.0)
    assert "clean_retraining" in report.timings


def test_given_noise_rate_sets_the_suspected_count(blobs: NoisyDataset) -> None:
    report = score_noise(blobs.samples, blobs.labels, config=dataclasses.replace(FAST, noise_rate=0.25))
    assert report.noise_rate_used == 0.25
    assert report.suspected.sum() == 50


def test_divergence_is_reported_not_turned_into_nan(blobs: NoisyDataset, tmp_path: Path) -> None:
    model = build_model("mlp", in_channels=0, num_classes=4, feature_dim=8)
    state = {key: value.fill_(1e19) for key, value in model.state_dict().items()}
    path = tmp_path / "huge.pt"
    torch.save(state, path)
    with pytest.raises(TrainingDiverged, match="pretrain_learning_rate: training loss became") as raised:
        score_noise(blobs.samples, blobs.labels, config=FAST, initial_weights=path)
    assert raised.value.field == "pretrain_learning_rate"


def test_initial_weights_that_do_not_fit_fail_before_training(blobs: NoisyDataset, tmp_path: Path) -> None:
    path = tmp_path / "wide.pt"
    torch.save(build_model("mlp", in_channels=0, num_classes=4, feature_dim=9).state_dict(), path)
    steps: list[str] = []
    with pytest.raises(ConfigError, match="initial_weights: does not fit the mlp model") as raised:
        score_noise(
            blobs.samples,
            blobs.labels,
            config=FAST,
            initial_weights=path,
            _fault_hook=lambda s, b: steps.append(s),
        )
    assert raised.value.field == "initial_weights"
    assert steps == []


def test_a_noise_rate_that_empties_stage_3_is_refused(blobs: NoisyDataset) -> None:
    config = dataclasses.replace(FAST, clean_retraining=True, noise_rate=0.95)
    with pytest.raises(ConfigError, match=r"noise_rate: 0\.95 would leave fewer than 2 training samples"):
        score_noise(blobs.samples, blobs.labels, config=config)


def test_initial_weights_are_used(blobs: NoisyDataset, tmp_path: Path) -> None:
    path = tmp_path / "init.pt"
    torch.save(build_model("mlp", in_channels=0, num_classes=4, feature_dim=8).state_dict(), path)
    plain = score_noise(blobs.samples, blobs.labels, config=FAST)
    started = score_noise(blobs.samples, blobs.labels, config=FAST, initial_weights=path)
    assert not np.array_equal(plain.noise_scores, started.noise_scores)


def test_checkpoint_interval_writes_the_last_boundary_on_a_stop_and_resumes_identically(
    blobs: NoisyDataset, tmp_path: Path
) -> None:
    uninterrupted = score_noise(blobs.samples, blobs.labels, config=FAST)
    checkpoint = tmp_path / "run.ckpt"
    with pytest.raises(Cancelled, match="cyclic epoch 2"):
        score_noise(
            blobs.samples,
            blobs.labels,
            config=FAST,
            checkpoint_path=checkpoint,
            checkpoint_interval_seconds=3600.0,  # written at stage 1's end, then only by the stop
            should_cancel=CancelAfter(40),
        )
    events: list[ProgressEvent] = []
    resumed = score_noise(
        blobs.samples, blobs.labels, config=FAST, checkpoint_path=checkpoint, progress=events.append
    )
    # The stop during cyclic epoch 2 wrote the boundary after cyclic epoch 1, kept in memory.
    assert (events[0].stage, events[0].epoch) == ("cyclic", 2)
    assert_same_report(uninterrupted, resumed)


def test_checkpoint_interval_must_be_finite_and_non_negative(blobs: NoisyDataset) -> None:
    with pytest.raises(ConfigError, match="checkpoint_interval_seconds"):
        score_noise(blobs.samples, blobs.labels, config=FAST, checkpoint_interval_seconds=-1.0)
