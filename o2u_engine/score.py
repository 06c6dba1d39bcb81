"""The public entry point: validate once, resolve the configuration, train, rank.

`score_noise` checks its inputs and turns every problem into a DataValidationError or
ConfigError before any training starts; `_score_noise` then trusts them. The report it returns
carries the resolved configuration, seed, versions, device and timings.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from o2u_engine import checkpoint
from o2u_engine.config import O2UConfig, ResolvedConfig
from o2u_engine.data import PreparedData, held_out_count
from o2u_engine.errors import ConfigError
from o2u_engine.models import initialized_model, is_convolutional, load_initial_weights
from o2u_engine.rank import NoiseRanking, noise_ranking
from o2u_engine.report import CleanRetrainingResult, NoiseReport, ProgressEvent
from o2u_engine.resolve import resolve_config
from o2u_engine.runtime import resolve_device
from o2u_engine.train import FaultHook, Trainer
from o2u_engine.validate import ValidatedInputs, validate_inputs
from o2u_engine.version import __version__


def score_noise(
    features: np.ndarray | torch.Tensor,
    labels: np.ndarray | Sequence[int] | torch.Tensor,
    *,
    config: O2UConfig = O2UConfig(),  # noqa: B008 - frozen, so a shared default is safe
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
    progress: Callable[[ProgressEvent], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    checkpoint_path: str | os.PathLike[str] | None = None,
    checkpoint_interval_seconds: float = 0.0,
    initial_weights: str | os.PathLike[str] | None = None,
    _fault_hook: FaultHook | None = None,
    _trainer: type[Trainer] = Trainer,
) -> NoiseReport:
    """Score every sample's label with O2U-Net; higher scores mean more likely mislabeled.

    `config` may be a ResolvedConfig (it resolves to itself) or leave choices to `resolve_config`.

    `features` are `(N, D)` feature vectors or images `(N, H, W)`, `(N, H, W, C)` or `(N, C, H, W)`
    (C in 1, 3, 4), uint8 or float; a numpy memmap is read in chunks. `labels` are N integers in
    `[0, num_classes)` (K = max label + 1 when not given). `progress` receives a ProgressEvent after
    every epoch; `should_cancel` is polled before every batch and makes training raise Cancelled.
    With `checkpoint_path`, the state is saved atomically at epoch boundaries and an existing
    file is resumed from (the caller deletes it when done): at every boundary by default, or, with
    `checkpoint_interval_seconds`, at the first boundary that many seconds after the last save, at
    the end of every stage, and when `should_cancel` stops an epoch (the last boundary, kept in
    memory, is written before Cancelled is raised).
    `initial_weights` is a state dict file for the resolved model, read with
    `torch.load(weights_only=True)`. `_trainer` is the trainer class: `DistributedTrainer` in a
    worker of `o2u_engine.launch.score_noise_workers`.
    """
    if not math.isfinite(checkpoint_interval_seconds) or checkpoint_interval_seconds < 0:
        raise ConfigError(
            f"checkpoint_interval_seconds: got {checkpoint_interval_seconds}, expected a finite value >= 0",
            field="checkpoint_interval_seconds",
        )
    inputs = validate_inputs(features, labels, num_classes=num_classes)
    torch_device = resolve_device(device)
    sample_shape = tuple(inputs.samples.shape[1:])
    resolved = resolve_config(
        config,
        num_samples=inputs.samples.shape[0],
        sample_shape=sample_shape,
        num_classes=inputs.num_classes,
        device=torch_device,
        workers=_trainer.workers(),
    )
    _check_stage3_keeps_samples(resolved, inputs.samples.shape[0])
    initial_state = None if initial_weights is None else _initial_state(initial_weights, resolved, inputs)
    return _score_noise(
        inputs,
        resolved,
        torch_device,
        progress=progress,
        should_cancel=should_cancel,
        checkpoint_path=None if checkpoint_path is None else os.fspath(checkpoint_path),
        checkpoint_interval_seconds=checkpoint_interval_seconds,
        initial_state=initial_state,
        fault_hook=_fault_hook,
        trainer_class=_trainer,
    )


def _check_stage3_keeps_samples(config: ResolvedConfig, num_samples: int) -> None:
    if config.clean_retraining and config.noise_rate:
        train_samples = num_samples - held_out_count(num_samples, config.validation_fraction)
        if train_samples - round(config.noise_rate * num_samples) < 2:
            raise ConfigError(
                f"noise_rate: {config.noise_rate} would leave fewer than 2 training samples for "
                "stage 3; expected a smaller value",
                field="noise_rate",
            )


def _initial_state(
    path: str | os.PathLike[str], config: ResolvedConfig, inputs: ValidatedInputs
) -> dict[str, torch.Tensor]:
    """The initial weights, checked against the resolved model before any data is prepared."""
    initial_state = load_initial_weights(path)
    initialized_model(  # a mismatch fails here
        config.model,
        layout=inputs.layout,
        num_classes=inputs.num_classes,
        image_size=config.image_size,
        seed=config.seed,
        initial_state=initial_state,
        device=torch.device("cpu"),
    )
    return initial_state


def _score_noise(
    inputs: ValidatedInputs,
    config: ResolvedConfig,
    device: torch.device,
    *,
    progress: Callable[[ProgressEvent], None] | None,
    should_cancel: Callable[[], bool] | None,
    checkpoint_path: str | None,
    checkpoint_interval_seconds: float,
    initial_state: dict[str, torch.Tensor] | None,
    fault_hook: FaultHook | None,
    trainer_class: type[Trainer] = Trainer,
) -> NoiseReport:
    started = time.perf_counter()
    data = PreparedData(
        inputs.samples,
        inputs.layout,
        inputs.stats,
        image_size=config.image_size,
        device=device,
        placement=config.data_placement,
        chunk_samples=config.stream_chunk_samples,
        channels_last=device.type == "cuda" and is_convolutional(config.model),
    )
    preparation_seconds = time.perf_counter() - started
    checkpoints = None
    if checkpoint_path is not None:
        fingerprint = checkpoint.run_fingerprint(
            config, inputs.labels, tuple(inputs.samples.shape[1:]), inputs.num_classes, __version__
        )
        checkpoints = checkpoint.Checkpoints(checkpoint_path, fingerprint, checkpoint_interval_seconds)
    trainer = trainer_class(
        data,
        inputs.labels,
        inputs.num_classes,
        config,
        progress=progress,
        should_cancel=should_cancel,
        checkpoints=checkpoints,
        initial_state=initial_state,
        fault_hook=fault_hook,
    )
    outcome = trainer.run()

    ranking_started = time.perf_counter()
    statistics = outcome.statistics
    ranking = noise_ranking(
        statistics.scores(config.score).cpu().numpy(),
        statistics.variance().cpu().numpy(),
        statistics.prediction_counts.cpu().numpy(),
        statistics.mean_probabilities().cpu().numpy(),
        inputs.labels,
        num_classes=inputs.num_classes,
        noise_rate=config.noise_rate,
        score=config.score,
        images=inputs.layout.is_images,
        rate_scores=statistics.rate_scores(config.score, images=inputs.layout.is_images),
    )
    timings = {"preparation": preparation_seconds, **outcome.timings}
    timings["ranking"] = time.perf_counter() - ranking_started
    timings["total"] = time.perf_counter() - started
    return _report(inputs, config, device, ranking, outcome.clean_retraining, timings)


def _report(
    inputs: ValidatedInputs,
    config: ResolvedConfig,
    device: torch.device,
    ranking: NoiseRanking,
    clean_retraining: CleanRetrainingResult | None,
    timings: dict[str, float],
) -> NoiseReport:
    suspects = ranking.suspects
    return NoiseReport(
        noise_scores=ranking.noise_scores,
        score_variance=ranking.score_variance,
        ranks=suspects.ranks,
        noise_probability=suspects.noise_probability,
        suspected=suspects.suspected,
        labels=inputs.labels,
        suggested_labels=ranking.suggested_labels,
        suggested_label_confidence=ranking.suggested_label_confidence,
        num_classes=inputs.num_classes,
        estimated_noise_rate=suspects.estimated_noise_rate,
        noise_rate_used=suspects.noise_rate_used,
        class_counts=ranking.class_counts,
        class_suspected=ranking.class_suspected,
        class_noise_rates=ranking.class_noise_rates,
        transition_matrix=ranking.transition_matrix,
        clean_retraining=clean_retraining,
        config=config,
        seed=config.seed,
        engine_version=__version__,
        torch_version=torch.__version__,
        device=str(device),
        timings=timings,
        noise_rate_capped=suspects.noise_rate_capped,
    )
