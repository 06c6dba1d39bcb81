"""Label accuracy with a Poisson-binomial interval: exact (brute force, binomial) and normal."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from o2u_engine.accuracy import EXACT_MAX_SAMPLES, label_accuracy, per_class_label_accuracy


def _brute_distribution(p: list[float]) -> list[float]:
    dist = [0.0] * (len(p) + 1)
    for outcome in itertools.product([0, 1], repeat=len(p)):
        prob = math.prod(pi if o else 1 - pi for pi, o in zip(p, outcome, strict=True))
        dist[sum(outcome)] += prob
    return dist


def test_exact_interval_matches_brute_force() -> None:
    p = [0.1, 0.5, 0.9, 0.3, 0.02, 0.7, 0.45, 0.6]
    dist = _brute_distribution(p)
    cdf = np.cumsum(dist)
    lo = int(np.searchsorted(cdf, 0.025))
    hi = int(np.searchsorted(cdf, 0.975))
    estimate = label_accuracy(np.array(p))
    assert estimate.method == "exact"
    assert estimate.mean == pytest.approx(1 - sum(p) / len(p))
    assert estimate.lower == pytest.approx(1 - hi / len(p))
    assert estimate.upper == pytest.approx(1 - lo / len(p))


def test_equal_probabilities_give_the_binomial_interval() -> None:
    n, q = 200, 0.1
    estimate = label_accuracy(np.full(n, q))
    pmf = [math.comb(n, k) * q**k * (1 - q) ** (n - k) for k in range(n + 1)]
    cdf = np.cumsum(pmf)
    assert estimate.upper == pytest.approx(1 - int(np.searchsorted(cdf, 0.025)) / n)
    assert estimate.lower == pytest.approx(1 - int(np.searchsorted(cdf, 0.975)) / n)
    assert estimate.lower < 0.9 < estimate.upper


def test_large_batches_use_the_normal_approximation() -> None:
    rng = np.random.default_rng(0)
    p = rng.beta(0.5, 8.0, size=EXACT_MAX_SAMPLES + 1000)
    estimate = label_accuracy(p)
    assert estimate.method == "normal"
    sd = math.sqrt(float((p * (1 - p)).sum())) / len(p)
    assert estimate.upper - estimate.lower == pytest.approx(2 * 1.959964 * sd, rel=1e-4)
    exact_like = label_accuracy(p[:EXACT_MAX_SAMPLES])
    assert exact_like.method == "exact"
    assert exact_like.lower < exact_like.mean < exact_like.upper


def test_certain_labels_and_empty_batches() -> None:
    assert label_accuracy(np.zeros(10)) == label_accuracy(np.zeros(10))
    zero = label_accuracy(np.zeros(10))
    assert (zero.mean, zero.lower, zero.upper) == (1.0, 1.0, 1.0)
    empty = label_accuracy(np.zeros(0))
    assert empty.num_samples == 0
    assert empty.mean == 1.0
    with pytest.raises(ValueError, match="level"):
        label_accuracy(np.zeros(3), level=1.0)


def test_per_class() -> None:
    p = np.array([0.0, 0.0, 1.0, 1.0, 0.5])
    labels = np.array([0, 0, 1, 1, 2])
    per_class = per_class_label_accuracy(p, labels, 4)
    assert [c.mean for c in per_class] == [1.0, 0.0, 0.5, 1.0]
    assert [c.num_samples for c in per_class] == [2, 2, 1, 0]
