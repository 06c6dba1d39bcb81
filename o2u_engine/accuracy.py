"""Estimated label accuracy of a batch, with an interval, from per-sample noise probabilities.

Each sample's label is wrong with its own probability `p_i` (the report's `noise_probability`).
Treating the samples as independent, the number of wrong labels is a Poisson-binomial variable
(a sum of independent Bernoullis): its mean is `sum(p_i)` and its variance `sum(p_i (1 - p_i))`.
The label accuracy is `1 - wrong / n`. The interval is the central one at the given level
(default 95%): for up to `EXACT_MAX_SAMPLES` samples it is exact, read from the distribution
computed by dynamic programming (`O(n^2)` time, `O(n)` memory); above that it is the normal
approximation (mean +- z * sd, clipped to [0, 1]), which the central limit theorem makes accurate
at such sizes. The interval covers the sampling of which labels are wrong given the probabilities;
it does not cover the error of the probabilities themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

__all__ = ["EXACT_MAX_SAMPLES", "AccuracyEstimate", "label_accuracy", "per_class_label_accuracy"]

EXACT_MAX_SAMPLES = 4096


@dataclass(frozen=True)
class AccuracyEstimate:
    """Expected label accuracy and its central interval; `method` is `exact` or `normal`."""

    mean: float
    lower: float
    upper: float
    level: float
    method: str
    num_samples: int


def _exact_counts_interval(p: np.ndarray, level: float) -> tuple[int, int]:
    """Central interval (lo, hi) of the number of successes of independent Bernoullis `p`."""
    dist = np.zeros(len(p) + 1, dtype=np.float64)
    dist[0] = 1.0
    for i, pi in enumerate(p):
        upto = i + 2
        shifted = dist[: upto - 1] * pi
        dist[:upto] *= 1.0 - pi
        dist[1:upto] += shifted
    cdf = np.cumsum(dist)
    tail = (1.0 - level) / 2.0
    lo = int(np.searchsorted(cdf, tail, side="left"))
    hi = int(np.searchsorted(cdf, 1.0 - tail, side="left"))
    return lo, min(hi, len(p))


def label_accuracy(noise_probability: np.ndarray, *, level: float = 0.95) -> AccuracyEstimate:
    """Label accuracy of the samples whose labels are wrong with probabilities `noise_probability`."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    p = np.clip(np.asarray(noise_probability, dtype=np.float64).reshape(-1), 0.0, 1.0)
    n = len(p)
    if n == 0:
        return AccuracyEstimate(1.0, 1.0, 1.0, level, "exact", 0)
    mean_wrong = float(p.sum())
    if n <= EXACT_MAX_SAMPLES:
        lo, hi = _exact_counts_interval(p, level)
        method = "exact"
        lower, upper = 1.0 - hi / n, 1.0 - lo / n
    else:
        sd = float(np.sqrt((p * (1.0 - p)).sum()))
        z = NormalDist().inv_cdf(0.5 + level / 2.0)
        method = "normal"
        lower = max(0.0, 1.0 - (mean_wrong + z * sd) / n)
        upper = min(1.0, 1.0 - (mean_wrong - z * sd) / n)
    mean = 1.0 - mean_wrong / n
    return AccuracyEstimate(mean, min(lower, mean), max(upper, mean), level, method, n)


def per_class_label_accuracy(
    noise_probability: np.ndarray, labels: np.ndarray, num_classes: int, *, level: float = 0.95
) -> list[AccuracyEstimate]:
    """`label_accuracy` of the samples given each label 0..num_classes-1."""
    p = np.asarray(noise_probability, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    return [label_accuracy(p[y == k], level=level) for k in range(num_classes)]
