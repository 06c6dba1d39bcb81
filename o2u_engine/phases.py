"""The plan of a run: which phases train, on which samples, with which schedule and batches.

Stage 1 (pre-training) and stage 2 (cyclic) train on every sample, since every sample needs a
score. Stage 3 holds out a seeded validation split and trains two fresh networks on the rest,
the second without the suspected samples, each as long as stages 1 and 2 together with the
learning rate decaying linearly from the stage-1 rate to r2, so both converge and compare.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

from o2u_engine.config import ResolvedConfig
from o2u_engine.data import ValidationSplit, held_out_count
from o2u_engine.report import ProgressEvent
from o2u_engine.schedule import constant_lr, cyclic_lr, linear_decay_lr


@dataclass(frozen=True)
class Phase:
    """One training run of a stage (stage 3 has two: without and with the suspects)."""

    stage: str  # "pretraining" | "cyclic" | "clean_retraining"
    epochs: int
    batch_size: int  # samples, before any out-of-memory halving
    learning_rate: Callable[[int], float]  # 1-based epoch of the phase -> rate
    samples: int  # trained per epoch, as planned: N, or stage 3's training split with the suspects
    fresh_model: bool = False  # start from newly initialized weights
    records_losses: bool = False  # fold per-sample losses into the statistics (stage 2)
    removes_suspects: bool = False  # stage 3's second model


def plan_phases(config: ResolvedConfig, num_samples: int) -> list[Phase]:
    """The phases of a run over `num_samples` samples, in order; phases of 0 epochs are left out."""
    cycle = config.cycle_length_epochs
    cyclic_epochs = cycle * config.num_cycles
    r1, r2 = config.cycle_max_learning_rate, config.cycle_min_learning_rate
    phases = [
        Phase(
            "pretraining",
            config.pretrain_epochs,
            config.pretrain_batch_size,
            partial(constant_lr, rate=config.pretrain_learning_rate),
            num_samples,
            fresh_model=True,
        ),
        Phase(
            "cyclic",
            cyclic_epochs,
            config.cyclic_batch_size,
            partial(cyclic_lr, cycle_length=cycle, r1=r1, r2=r2),
            num_samples,
            records_losses=True,
        ),
    ]
    if config.clean_retraining:
        epochs = config.pretrain_epochs + cyclic_epochs
        decay = partial(linear_decay_lr, epochs=epochs, start=config.pretrain_learning_rate, end=r2)
        train_samples = num_samples - held_out_count(num_samples, config.validation_fraction)
        for removes in (False, True):
            phases.append(
                Phase(
                    "clean_retraining",
                    epochs,
                    config.pretrain_batch_size,
                    decay,
                    train_samples,
                    fresh_model=True,
                    removes_suspects=removes,
                )
            )
    return [phase for phase in phases if phase.epochs > 0]


@dataclass(frozen=True)
class RetrainingSamples:
    """What stage 3 trains and measures on; known once stage 2's statistics name the suspects."""

    train: np.ndarray  # (n,) the training split, sorted
    kept: np.ndarray  # the training split without the suspected samples
    evaluation: np.ndarray  # the held-out samples whose labels are trusted (see below)

    @property
    def removed(self) -> int:
        return int(self.train.shape[0] - self.kept.shape[0])


def retraining_samples(split: ValidationSplit, suspected: np.ndarray) -> RetrainingSamples:
    """Stage 3's samples for the suspected set (N,) bool. Accuracy is measured on the held-out
    samples that are not suspected themselves, or on all of them when every one is."""
    trusted = split.held_out[~suspected[split.held_out]]
    return RetrainingSamples(
        train=split.train,
        kept=split.train[~suspected[split.train]],
        evaluation=trusted if trusted.shape[0] > 0 else split.held_out,
    )


def phase_indices(phase: Phase, num_samples: int, retraining: RetrainingSamples | None) -> np.ndarray:
    """The samples `phase` trains on, (n,) sorted: all of them in stages 1 and 2, and stage 3's
    training split, without the suspects for its second model (`retraining` is None before)."""
    if phase.stage != "clean_retraining":
        return np.arange(num_samples)
    if retraining is None:
        raise ValueError("stage 3 needs the suspects of stage 2; none were given")
    return retraining.kept if phase.removes_suspects else retraining.train


def stage_epoch(phases: list[Phase], index: int, epoch: int) -> int:
    """1-based epoch within the stage of `phases[index]` (stage 3's two phases count on)."""
    return sum(p.epochs for p in phases[:index] if p.stage == phases[index].stage) + epoch


def progress_event(
    phases: list[Phase],
    index: int,
    epoch: int,
    *,
    mean_loss: float,
    learning_rate: float,
    seconds: float,
) -> ProgressEvent:
    """The event for epoch `epoch` of `phases[index]`, which took `seconds`; the ETA assumes the
    rest of the run trains at the same rate."""
    phase = phases[index]
    per_second = phase.samples / max(seconds, 1e-9)
    remaining = (phase.epochs - epoch) * phase.samples + sum(
        p.epochs * p.samples for p in phases[index + 1 :]
    )
    done = sum(p.epochs for p in phases[:index]) + epoch
    return ProgressEvent(
        stage=phase.stage,
        epoch=stage_epoch(phases, index, epoch),
        epochs_total=sum(p.epochs for p in phases if p.stage == phase.stage),
        fraction_done=min(1.0, done / max(1, sum(p.epochs for p in phases))),
        mean_loss=mean_loss,
        learning_rate=learning_rate,
        samples_per_second=per_second,
        eta_seconds=remaining / per_second,
    )
