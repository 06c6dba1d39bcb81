"""Quality floor on real data: scikit-learn's handwritten digits with 20% symmetric label noise.

The default configuration must put the flipped labels at the top of the ranking (precision at
k = number of flipped labels) and estimate the noise rate. Deterministic: fixed noise and seed.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score

from o2u_engine import score_noise
from tests.o2u_engine.engine_testing import flip_labels


def test_digits_with_20_percent_noise() -> None:
    features, true_labels = load_digits(return_X_y=True)  # 1,797 real 8x8 digits, 64 features
    labels = flip_labels(true_labels, 10, 0.2, seed=0)
    is_noisy = labels != true_labels
    k = int(is_noisy.sum())
    assert k == 359

    report = score_noise(features.astype(np.float32), labels)

    precision_at_k = is_noisy[report.order()[:k]].mean()
    assert precision_at_k >= 0.85
    assert roc_auc_score(is_noisy, report.noise_scores) >= 0.95
    assert report.estimated_noise_rate == pytest.approx(0.2, abs=0.05)
    assert report.suspected.sum() == round(report.estimated_noise_rate * labels.shape[0])
    # The suggested label recovers the true class of most flipped samples.
    assert (report.suggested_labels[is_noisy] == true_labels[is_noisy]).mean() >= 0.85
