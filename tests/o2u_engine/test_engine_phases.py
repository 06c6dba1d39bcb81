"""The plan of a run: phases with their sample counts, stage 3's samples, and progress figures."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from o2u_engine import O2UConfig, ResolvedConfig, resolve_config
from o2u_engine.data import ValidationSplit
from o2u_engine.phases import phase_indices, plan_phases, progress_event, retraining_samples


def resolved(**changes: Any) -> ResolvedConfig:
    return resolve_config(
        O2UConfig(**{"pretrain_epochs": 2, "cycle_length_epochs": 2, "num_cycles": 1, **changes}),
        num_samples=100,
        sample_shape=(8,),
        num_classes=4,
        device="cpu",
    )


def test_every_phase_knows_how_many_samples_it_trains() -> None:
    phases = plan_phases(resolved(clean_retraining=True), 100)
    assert [(p.stage, p.epochs, p.samples, p.fresh_model, p.removes_suspects) for p in phases] == [
        ("pretraining", 2, 100, True, False),
        ("cyclic", 2, 100, False, False),
        ("clean_retraining", 4, 90, True, False),  # validation_fraction 0.1 holds out 10
        ("clean_retraining", 4, 90, True, True),  # as planned: the suspects are not known yet
    ]
    assert [p.stage for p in plan_phases(resolved(pretrain_epochs=0), 100)] == ["cyclic"]


def test_stage_3_trains_without_the_suspects_and_measures_on_trusted_held_out_samples() -> None:
    split = ValidationSplit(train=np.array([0, 1, 2, 3, 5]), held_out=np.array([4, 6]))
    suspected = np.zeros(7, dtype=bool)
    suspected[[1, 4]] = True
    retraining = retraining_samples(split, suspected)
    assert retraining.kept.tolist() == [0, 2, 3, 5]
    assert retraining.removed == 1
    assert retraining.evaluation.tolist() == [6]
    suspected[6] = True  # every held-out sample suspected: measure on all of them
    assert retraining_samples(split, suspected).evaluation.tolist() == [4, 6]

    pretraining, cyclic, without_removal, with_removal = plan_phases(resolved(clean_retraining=True), 7)
    assert phase_indices(pretraining, 7, None).tolist() == list(range(7))
    assert phase_indices(cyclic, 7, retraining).tolist() == list(range(7))
    assert phase_indices(without_removal, 7, retraining).tolist() == [0, 1, 2, 3, 5]
    assert phase_indices(with_removal, 7, retraining).tolist() == [0, 2, 3, 5]
    with pytest.raises(ValueError, match="stage 3 needs the suspects"):
        phase_indices(with_removal, 7, None)


def test_progress_counts_epochs_within_a_stage_and_plans_the_rest_at_the_same_rate() -> None:
    phases = plan_phases(resolved(clean_retraining=True), 100)
    first = progress_event(phases, 0, 1, mean_loss=1.5, learning_rate=0.01, seconds=2.0)
    assert (first.stage, first.epoch, first.epochs_total) == ("pretraining", 1, 2)
    assert first.samples_per_second == 50.0
    # One more stage-1 epoch of 100 samples, 2 cyclic of 100, and 2 x 4 stage-3 epochs of 90.
    assert first.eta_seconds == pytest.approx((100 + 200 + 720) / 50.0)
    assert first.fraction_done == pytest.approx(1 / 12)
    last = progress_event(phases, 3, 4, mean_loss=0.5, learning_rate=0.001, seconds=1.0)
    assert (last.stage, last.epoch, last.epochs_total) == ("clean_retraining", 8, 8)
    assert (last.eta_seconds, last.fraction_done) == (0.0, 1.0)
