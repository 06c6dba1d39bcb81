"""The learning-rate schedules against hand-computed values."""

from __future__ import annotations

import itertools

import pytest

from o2u_engine import cyclic_lr
from o2u_engine.schedule import constant_lr, linear_decay_lr


@pytest.mark.parametrize(
    ("epoch", "expected"),
    [
        # c = 5, r1 = 0.01, r2 = 0.001: s(t) = (1 + (t - 1) mod 5) / 5, r = (1 - s) r1 + s r2
        (1, 0.8 * 0.01 + 0.2 * 0.001),  # s = 0.2 -> 0.0082
        (2, 0.6 * 0.01 + 0.4 * 0.001),  # 0.0064
        (3, 0.4 * 0.01 + 0.6 * 0.001),  # 0.0046
        (4, 0.2 * 0.01 + 0.8 * 0.001),  # 0.0028
        (5, 0.001),  # s = 1: the cycle ends exactly at r2
        (6, 0.0082),  # the next cycle starts over
        (10, 0.001),
        (13, 0.0046),
    ],
)
def test_cyclic_lr_matches_the_paper_formula(epoch: int, expected: float) -> None:
    assert cyclic_lr(epoch, 5, 0.01, 0.001) == pytest.approx(expected, rel=1e-12)


def test_cyclic_lr_with_the_reference_cycle_length() -> None:
    values = [cyclic_lr(t, 10, 0.01, 0.001) for t in range(1, 21)]
    assert values[0] == pytest.approx(0.0091)  # s = 0.1
    assert values[9] == pytest.approx(0.001)
    assert values[10] == pytest.approx(0.0091)
    assert all(a > b for a, b in itertools.pairwise(values[:10]))  # decreasing within a cycle


def test_cycle_of_one_epoch_is_always_r2() -> None:
    assert {cyclic_lr(t, 1, 0.01, 0.001) for t in range(1, 5)} == {0.001}


@pytest.mark.parametrize(("epoch", "cycle"), [(0, 5), (1, 0), (-3, 2)])
def test_cyclic_lr_rejects_invalid_arguments(epoch: int, cycle: int) -> None:
    with pytest.raises(ValueError, match=">= 1"):
        cyclic_lr(epoch, cycle, 0.01, 0.001)


def test_linear_decay_and_constant() -> None:
    assert linear_decay_lr(1, 5, 0.01, 0.001) == pytest.approx(0.01)
    assert linear_decay_lr(3, 5, 0.01, 0.001) == pytest.approx(0.0055)
    assert linear_decay_lr(5, 5, 0.01, 0.001) == pytest.approx(0.001)
    assert linear_decay_lr(1, 1, 0.01, 0.001) == pytest.approx(0.001)
    assert constant_lr(7, rate=0.02) == 0.02
    with pytest.raises(ValueError, match="epoch must be in"):
        linear_decay_lr(6, 5, 0.01, 0.001)
