"""The benchmarks' look-alike label noise (bench/common.lookalike_noise)."""

from __future__ import annotations

import numpy as np

from bench.common import NoiseSetting, inject_noise, load_digits_features, lookalike_noise


def test_look_alike_noise_flips_an_exact_share_of_every_class_to_another_class() -> None:
    vectors, labels = load_digits_features()
    noisy, flipped = lookalike_noise(vectors, labels, 0.2, 10, seed=0)
    assert np.array_equal(flipped, noisy != labels)
    for c in range(10):
        members = labels == c
        assert flipped[members].sum() == round(0.2 * members.sum())
    again, _ = lookalike_noise(vectors, labels, 0.2, 10, seed=0)
    assert np.array_equal(again, noisy)
    assert not np.array_equal(lookalike_noise(vectors, labels, 0.2, 10, seed=1)[0], noisy)


def test_look_alike_noise_falls_on_samples_that_resemble_their_new_class() -> None:
    """A held-out classifier gives a flipped sample's new label far more probability than a
    symmetric flip's (measured: 0.23 against 0.015 on average)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    vectors, labels = load_digits_features()
    probabilities = cross_val_predict(
        LogisticRegression(max_iter=2000), vectors, labels, cv=5, method="predict_proba"
    )
    look_alike, flipped = lookalike_noise(vectors, labels, 0.2, 10, seed=0)
    symmetric, random_flips = inject_noise(labels, NoiseSetting("symmetric", 0.2), 10, seed=0)
    rows = np.arange(len(labels))
    resemblance = probabilities[rows, look_alike][flipped].mean()
    chance = probabilities[rows, symmetric][random_flips].mean()
    assert resemblance > 5 * chance
