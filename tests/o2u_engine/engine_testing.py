"""Shared pieces of the engine tests: short-run config, noisy datasets and label flipping."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from o2u_engine import O2UConfig

# Short runs: enough epochs to exercise every phase, few enough for a fast suite.
FAST = O2UConfig(
    pretrain_epochs=3,
    cycle_length_epochs=2,
    num_cycles=2,
    pretrain_batch_size=32,
    cyclic_batch_size=16,
)


@dataclass(frozen=True)
class NoisyDataset:
    samples: np.ndarray
    labels: np.ndarray  # given (noisy) labels
    true_labels: np.ndarray
    num_classes: int

    @property
    def is_noisy(self) -> np.ndarray:
        noisy: np.ndarray = self.labels != self.true_labels
        return noisy


def flip_labels(true_labels: np.ndarray, num_classes: int, fraction: float, seed: int) -> np.ndarray:
    """Symmetric noise: `fraction` of the labels moved to a different class chosen uniformly."""
    rng = np.random.default_rng(seed)
    labels = true_labels.copy()
    flipped = rng.permutation(labels.shape[0])[: round(fraction * labels.shape[0])]
    labels[flipped] = (labels[flipped] + rng.integers(1, num_classes, flipped.shape[0])) % num_classes
    return labels
