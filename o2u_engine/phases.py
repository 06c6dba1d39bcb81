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

from o2u_engine.config import ResolvedConfig
from o2u_engine.report import ProgressEvent
from o2u_engine.schedule import constant_lr, cyclic_lr, linear_decay_lr


@dataclass(frozen=True)
class Phase:
    """One training run of a stage (stage 3 has two: without and with the suspects)."""

    stage: str  # "pretraining" | "cyclic" | "clean_retraining"
    epochs: int
    batch_size: int  # samples, before any out-of-memory halving
    learning_rate: Callable[[int], float]  # 1-based epoch of the phase -> rate
    fresh_model: bool = False  # start from newly initialized weights
    records_losses: bool = False  # fold per-sample losses into the statistics (stage 2)
    removes_suspects: bool = False  # stage 3's second model


def plan_phases(config: ResolvedConfig) -> list[Phase]:
    """The phases of a run, in order; phases of 0 epochs are left out."""
    pretrain_epochs = config.pretrain_epochs
    pretrain_batch = config.pretrain_batch_size
    cycle = config.cycle_length_epochs
    cyclic_epochs = cycle * config.num_cycles
    r1, r2 = config.cycle_max_learning_rate, config.cycle_min_learning_rate
    phases = [
        Phase(
            "pretraining",
            pretrain_epochs,
            pretrain_batch,
            partial(constant_lr, rate=config.pretrain_learning_rate),
            fresh_model=True,
        ),
        Phase(
            "cyclic",
            cyclic_epochs,
            config.cyclic_batch_size,
            partial(cyclic_lr, cycle_length=cycle, r1=r1, r2=r2),
            records_losses=True,
        ),
    ]
    if config.clean_retraining:
        epochs = pretrain_epochs + cyclic_epochs
        decay = partial(linear_decay_lr, epochs=epochs, start=config.pretrain_learning_rate, end=r2)
        for removes in (False, True):
            phases.append(
                Phase(
                    "clean_retraining",
                    epochs,
                    pretrain_batch,
                    decay,
                    fresh_model=True,
                    removes_suspects=removes,
                )
            )
    return [phase for phase in phases if phase.epochs > 0]


def stage_epoch(phases: list[Phase], index: int, epoch: int) -> int:
    """1-based epoch within the stage of `phases[index]` (stage 3's two phases count on)."""
    return sum(p.epochs for p in phases[:index] if p.stage == phases[index].stage) + epoch


def progress_event(
    phases: list[Phase],
    phase_samples: list[int],
    index: int,
    epoch: int,
    *,
    mean_loss: float,
    learning_rate: float,
    seconds: float,
) -> ProgressEvent:
    """The event for epoch `epoch` of `phases[index]`, which trained `phase_samples[index]` samples
    in `seconds`; the ETA assumes the rest of the run trains at the same rate."""
    phase = phases[index]
    per_second = phase_samples[index] / max(seconds, 1e-9)
    remaining = (phase.epochs - epoch) * phase_samples[index]
    remaining += sum(
        p.epochs * n for p, n in zip(phases[index + 1 :], phase_samples[index + 1 :], strict=True)
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
