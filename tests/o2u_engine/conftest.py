"""Fixtures for the engine tests: small synthetic datasets with known flipped labels.

Tests run torch on one thread: the datasets are tiny (threads only add overhead) and on a shared
two-core machine a second spinning thread makes each step many times slower.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from tests.o2u_engine.engine_testing import NoisyDataset, flip_labels


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def blobs() -> NoisyDataset:
    """200 feature vectors in 4 well-separated Gaussian clusters, 15% of labels flipped."""
    rng = np.random.default_rng(7)
    true_labels = np.arange(200) % 4
    centers = rng.normal(size=(4, 8)) * 3.0
    samples = (centers[true_labels] + rng.normal(size=(200, 8))).astype(np.float32)
    return NoisyDataset(samples, flip_labels(true_labels, 4, 0.15, seed=1), true_labels, 4)


@pytest.fixture(scope="session")
def tiny_images() -> NoisyDataset:
    """96 grayscale 8x8 uint8 images of 3 stroke patterns (row, column, diagonal), 10% flipped."""
    rng = np.random.default_rng(3)
    true_labels = np.arange(96) % 3
    images = rng.integers(0, 60, size=(96, 8, 8)).astype(np.int64)
    for index, label in enumerate(true_labels):
        position = int(rng.integers(1, 7))
        if label == 0:
            images[index, position, :] += 180
        elif label == 1:
            images[index, :, position] += 180
        else:
            images[index, np.arange(8), np.arange(8)] += 180
    samples = np.clip(images, 0, 255).astype(np.uint8)
    return NoisyDataset(samples, flip_labels(true_labels, 3, 0.1, seed=2), true_labels, 3)
