"""Ranking: the Gaussian-mixture noise estimate, suspects, suggested labels and summaries."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from o2u_engine import rank
from o2u_engine.rank import (
    confident_disagreement,
    cyclic_suspects,
    estimate_noise,
    estimate_separated,
    fit_two_gaussians,
    noise_ranking,
    noise_scores,
    rank_scores,
    rate_estimator,
    rate_score,
    separation,
    suggest_labels,
    suspected_mask,
    suspected_set,
    transition_matrix,
)


@pytest.mark.parametrize("weight", [0.1, 0.25, 0.4])
def test_em_recovers_a_known_mixture(weight: float) -> None:
    rng = np.random.default_rng(0)
    n_high = round(weight * 4000)
    values = np.concatenate([rng.normal(0.0, 1.0, 4000 - n_high), rng.normal(6.0, 1.5, n_high)])
    mixture = fit_two_gaussians(values)
    assert mixture is not None
    assert mixture.weights[1] == pytest.approx(weight, abs=0.02)
    assert mixture.means[0] == pytest.approx(0.0, abs=0.1)
    assert mixture.means[1] == pytest.approx(6.0, abs=0.15)
    assert np.sqrt(mixture.variances[1]) == pytest.approx(1.5, abs=0.1)


@pytest.mark.parametrize(
    "scores",
    [
        np.zeros(50),
        np.full(50, 3.25),
        np.array([1.0, 2.0]),
        np.array([]),
        np.concatenate([np.zeros(49), [1e6]]),
        np.concatenate([np.zeros(25), np.ones(25)]),
    ],
)
def test_degenerate_scores_never_give_nan(scores: np.ndarray) -> None:
    probability, rate, _ = estimate_noise(scores)
    assert probability.shape == scores.shape
    assert np.all(np.isfinite(probability))
    assert np.all((probability >= 0) & (probability <= 1))
    assert 0.0 <= rate <= 0.5


def test_all_equal_scores_mean_no_noise() -> None:
    probability, rate, capped = estimate_noise(np.full(100, -0.5))
    assert rate == 0.0
    assert not probability.any()
    assert not capped


def _majority_high_scores() -> np.ndarray:
    """Scores whose mixture puts most samples in the high group: a cluster of easy samples at the
    bottom, the bulk above it (an under-trained run, or a clean set trained long, fit like this)."""
    rng = np.random.default_rng(1)
    scores = np.concatenate([rng.normal(0, 0.1, 200), rng.normal(3, 0.1, 800)])
    mixture = fit_two_gaussians(np.cbrt(scores - scores.min()))
    assert mixture is not None
    assert mixture.weights[1] > 0.5
    return scores


def test_a_capped_estimate_falls_back_to_the_labels_the_network_disagrees_with() -> None:
    scores = _majority_high_scores()
    disagrees = np.zeros(1000, dtype=bool)
    disagrees[np.argsort(-scores)[:30]] = True  # the network disagrees with the 30 highest scores
    disagrees[np.argsort(scores)[500]] = True  # ...and with one in the middle
    probability, rate, capped = estimate_noise(scores, disagrees)
    assert capped
    assert rate == pytest.approx(31 / 1000)
    order = np.argsort(scores, kind="stable")
    assert np.all(np.diff(probability[order]) >= 0)  # still non-decreasing in the score
    assert probability.mean() == pytest.approx(rate)  # the isotonic fit keeps the disagreement's mean
    assert probability[order[-1]] == 1.0
    assert probability[order[0]] == 0.0
    suspects = suspected_set(scores, 0.0, disagrees)
    assert (suspects.noise_rate_capped, int(suspects.suspected.sum())) == (True, 31)


def test_a_capped_clean_set_is_not_reported_half_wrong() -> None:
    scores = _majority_high_scores()
    agreed = np.zeros(1000, dtype=bool)  # a clean set trained long: the network agrees with every label
    suspects = suspected_set(scores, 0.0, agreed)
    assert (suspects.noise_rate_capped, suspects.estimated_noise_rate, int(suspects.suspected.sum())) == (
        True,
        0.0,
        0,
    )
    assert not suspects.noise_probability.any()
    # Without the predictions the estimate stays at the cap, flagged.
    assert estimate_noise(scores)[1:] == (0.5, True)


def test_confident_disagreement_needs_a_vote_share_at_the_class_threshold() -> None:
    # Class thresholds: the mean share each class gets from its own samples. Class 0's samples give
    # it 1.0, 1.0, 0.4 (threshold 0.8); class 1's give 1.0, 0.6, 0.2 (threshold 0.6).
    counts = np.array(
        [
            [10, 0],  # label 0, all votes for 0
            [10, 0],  # label 0
            [4, 6],  # label 0, most votes for 1 at 0.6 >= class 1's threshold: flagged
            [0, 10],  # label 1
            [4, 6],  # label 1, its own share 0.6 reaches the threshold
            [8, 2],  # label 1, class 0 at 0.8 reaches class 0's threshold: flagged
        ],
        dtype=np.int32,
    )
    labels = np.array([0, 0, 0, 1, 1, 1])
    assert confident_disagreement(counts, labels).tolist() == [False, False, True, False, False, True]
    # Plain disagreement would also flag a split vote below the other class's threshold.
    split = np.array([[10, 0], [10, 0], [6, 4], [0, 10], [0, 10], [3, 7]], dtype=np.int32)
    # class 0's threshold (1 + 1 + 0.6) / 3 = 0.867: sample 5's 0.3 for class 0 does not reach it
    assert confident_disagreement(split, labels).tolist() == [False] * 6


def test_confident_disagreement_on_ties_and_silent_classes() -> None:
    # A tie with the given label keeps it (every threshold here is 0.5).
    ties = np.full((4, 2), 5, dtype=np.int32)
    assert not confident_disagreement(ties, np.array([0, 0, 1, 1])).any()
    # A class its own samples never vote for (class 2) or that no sample carries (class 1) has
    # threshold 0 and never counts, or every sample would reach it; class 0's threshold is 0.95.
    counts = np.array([[9, 0, 1], [10, 0, 0], [10, 0, 0], [0, 10, 0]], dtype=np.int32)
    flagged = confident_disagreement(counts, np.array([0, 0, 2, 2]))
    assert flagged.tolist() == [False, False, True, False]
    assert confident_disagreement(np.zeros((0, 3), dtype=np.int32), np.zeros(0, dtype=np.int64)).shape == (0,)


def test_an_underfitted_run_does_not_count_its_uncertain_samples() -> None:
    """A network that still gets hard clean samples wrong now and then: plain disagreement counts
    them, the confident joint only the samples voted for another class as firmly as that class's
    own samples vote for it."""
    rng = np.random.default_rng(0)
    num_samples, num_classes, epochs = 2000, 5, 15
    true = np.arange(num_samples) % num_classes
    labels = true.copy()
    wrong = rng.random(num_samples) < 0.1
    labels[wrong] = (true[wrong] + rng.integers(1, num_classes, wrong.sum())) % num_classes
    # Per-sample probability of predicting the true class each epoch: easy (0.95) or hard (0.3);
    # a wrong vote goes to a random other class.
    hit = np.where(rng.random(num_samples) < 0.8, 0.95, 0.3)
    votes = np.where(
        rng.random((num_samples, epochs)) < hit[:, None],
        true[:, None],
        (true[:, None] + rng.integers(1, num_classes, (num_samples, epochs))) % num_classes,
    )
    counts = np.zeros((num_samples, num_classes), dtype=np.int32)
    np.add.at(counts, (np.repeat(np.arange(num_samples), epochs), votes.ravel()), 1)
    plain = counts.argmax(axis=1) != labels
    confident = confident_disagreement(counts, labels)
    assert wrong.mean() == pytest.approx(0.105)
    assert plain.mean() > 0.18  # the hard clean samples inflate it...
    assert wrong[plain].mean() < 0.6
    assert confident.mean() == pytest.approx(wrong.mean(), abs=0.03)  # ...but not the confident count
    assert wrong[confident].mean() >= 0.95


def test_a_minority_high_group_is_not_capped() -> None:
    rng = np.random.default_rng(5)
    scores = np.concatenate([rng.normal(0, 0.1, 700), rng.normal(3, 0.1, 300)])
    _, rate, capped = estimate_noise(scores)
    assert not capped
    assert rate == pytest.approx(0.3, abs=0.02)


def test_noise_probability_is_monotone_in_the_score() -> None:
    rng = np.random.default_rng(2)
    scores = np.concatenate([rng.gamma(1.0, 0.05, 900), rng.normal(2.0, 0.8, 100)])
    probability, rate, _ = estimate_noise(scores)
    order = np.argsort(scores)
    assert np.all(np.diff(probability[order]) >= 0)
    assert probability[np.argmax(scores)] > 0.99
    assert probability[np.argmin(scores)] < 0.01
    assert rate == pytest.approx(0.1, abs=0.03)


def test_ranks_and_suspects() -> None:
    scores = np.array([0.1, 0.9, 0.5, 0.9, -1.0])
    ranks = rank_scores(scores)
    assert ranks.tolist() == [4, 1, 3, 2, 5]  # the tie keeps sample order
    assert suspected_mask(ranks, 0.4).tolist() == [False, True, False, True, False]
    assert suspected_mask(ranks, 0.0).sum() == 0
    assert suspected_mask(ranks, 0.5).sum() == 2  # round(2.5) = 2


def test_the_suspected_set_uses_the_given_rate_or_else_the_estimated_one() -> None:
    rng = np.random.default_rng(4)
    scores = noise_scores(np.concatenate([rng.normal(0, 0.05, 80), rng.normal(3, 0.05, 20), [np.nan]]))
    assert scores[-1] == 0.0  # a NaN score counts as an average sample, never as a suspect
    estimated = suspected_set(scores, 0.0)
    assert estimated.noise_rate_used == estimated.estimated_noise_rate == pytest.approx(20 / 101, abs=0.02)
    assert set(np.flatnonzero(estimated.suspected)) == set(range(80, 100))
    given = suspected_set(scores, 0.1)
    assert given.noise_rate_used == 0.1
    assert given.estimated_noise_rate == estimated.estimated_noise_rate
    assert given.suspected.sum() == 10
    assert np.array_equal(given.ranks, estimated.ranks)


def test_suggested_labels_are_the_likeliest_class_and_prefer_the_given_label_on_ties() -> None:
    probabilities = np.array([[0.4, 0.4, 0.2], [0.1, 0.2, 0.7], [1 / 3, 1 / 3, 1 / 3], [0.0, 1.0, 0.0]])
    labels = np.array([1, 1, 0, 2])
    suggested, confidence = suggest_labels(probabilities, labels, np.zeros(4, dtype=bool))
    assert suggested.tolist() == [1, 2, 0, 1]
    np.testing.assert_allclose(confidence, [0.4, 0.7, 1 / 3, 1.0])


def test_a_suspect_is_never_suggested_its_given_label() -> None:
    # The network still favours the given label of samples 0 and 2; as suspects they get the
    # likeliest other class (ties: the lowest), while sample 1, not suspected, keeps its own.
    probabilities = np.array([[0.1, 0.6, 0.3], [0.2, 0.7, 0.1], [0.0, 0.0, 1.0], [0.5, 0.1, 0.4]])
    labels = np.array([1, 1, 2, 2])
    suspected = np.array([True, False, True, True])
    suggested, confidence = suggest_labels(probabilities, labels, suspected)
    assert suggested.tolist() == [2, 1, 0, 0]
    np.testing.assert_allclose(confidence, [0.3, 0.7, 0.0, 0.5])
    assert not np.any(suggested[suspected] == labels[suspected])


def per_class_inputs(num_samples: int, num_classes: int) -> tuple[np.ndarray, ...]:
    """Votes (int32), mean probabilities (float32, a few NaN, some ties), labels and suspects."""
    rng = np.random.default_rng(3)
    counts = rng.integers(0, 4, (num_samples, num_classes)).astype(np.int32)
    probabilities = rng.random((num_samples, num_classes)).astype(np.float32)
    probabilities[:, 1] = probabilities[:, 0]
    probabilities[rng.random(probabilities.shape) < 0.01] = np.nan
    return counts, probabilities, rng.integers(0, num_classes, num_samples), rng.random(num_samples) < 0.4


def test_the_per_class_reads_give_the_same_answers_chunk_by_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    counts, probabilities, labels, suspected = per_class_inputs(301, 7)
    whole = confident_disagreement(counts, labels), *suggest_labels(probabilities, labels, suspected)
    monkeypatch.setattr(rank, "CHUNK_ENTRIES", 10)  # one sample at a time, the last chunk short
    chunked = confident_disagreement(counts, labels), *suggest_labels(probabilities, labels, suspected)
    for one, other in zip(whole, chunked, strict=True):
        np.testing.assert_array_equal(one, other)
    assert whole[0].any()
    assert not whole[0].all()


def test_the_per_class_reads_never_copy_all_the_votes_or_probabilities(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A million samples of a thousand classes are 4 GB of votes and 4 GB of probabilities: one
    # float64 copy of either would be 8 GB more. Here 5,000,000 entries, chunks of 65,536.
    counts, probabilities, labels, suspected = per_class_inputs(100_000, 50)
    monkeypatch.setattr(rank, "CHUNK_ENTRIES", 1 << 16)
    for read in (
        lambda: confident_disagreement(counts, labels),
        lambda: suggest_labels(probabilities, labels, suspected),
    ):
        tracemalloc.start()
        try:
            read()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < counts.nbytes // 4  # a float64 copy would be twice counts.nbytes


def test_transition_matrix_counts_suspects_toward_suggested_label_and_others_toward_given() -> None:
    labels = np.array([0, 0, 0, 1, 1, 2])
    suggested = np.array([1, 1, 2, 1, 0, 2])
    suspected = np.array([True, True, True, False, True, False])
    matrix = transition_matrix(labels, suggested, suspected, 4)
    np.testing.assert_allclose(matrix[0], [0, 2 / 3, 1 / 3, 0])
    np.testing.assert_allclose(matrix[1], [1 / 2, 1 / 2, 0, 0])  # one suspect, one kept label
    np.testing.assert_allclose(matrix[2], [0, 0, 1, 0])  # no suspects in class 2
    np.testing.assert_allclose(matrix[3], [0, 0, 0, 1])  # empty class
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0)


def test_noise_ranking_summaries() -> None:
    rng = np.random.default_rng(3)
    labels = np.arange(100) % 4
    scores = rng.normal(0, 0.05, 100)
    scores[:10] += 3.0
    counts = np.zeros((100, 4), dtype=np.int32)
    counts[np.arange(100), labels] = 4
    counts[:10] = 0
    counts[np.arange(10), (labels[:10] + 1) % 4] = 4
    probabilities = counts / 4.0
    ranking = noise_ranking(
        scores, np.zeros(100), counts, probabilities, labels, num_classes=4, noise_rate=0.0
    )
    assert ranking.suspects.estimated_noise_rate == pytest.approx(0.1, abs=0.02)
    assert set(np.flatnonzero(ranking.suspects.suspected)) == set(range(10))
    assert ranking.class_counts.tolist() == [25, 25, 25, 25]
    assert ranking.class_suspected.tolist() == [3, 3, 2, 2]
    np.testing.assert_allclose(ranking.class_noise_rates, [0.12, 0.12, 0.08, 0.08])
    np.testing.assert_allclose(ranking.transition_matrix[0], [0.88, 0.12, 0, 0])
    np.testing.assert_allclose(np.diag(ranking.transition_matrix), 1 - ranking.class_noise_rates)
    np.testing.assert_array_equal(ranking.suggested_labels[:10], (labels[:10] + 1) % 4)
    np.testing.assert_array_equal(ranking.suggested_labels[10:], labels[10:])
    fixed = noise_ranking(
        scores, np.zeros(100), counts, probabilities, labels, num_classes=4, noise_rate=0.05
    )
    assert fixed.suspects.noise_rate_used == 0.05
    assert fixed.suspects.suspected.sum() == 5


def test_the_separated_estimator_falls_back_to_the_disagreeing_labels_when_scores_overlap() -> None:
    # One normal group: no two modes. (Evenly spread scores would not do: a uniform's two halves
    # are D = 3 apart, and its symmetric fit sits exactly on the 0.5 weight limit.)
    scores = np.random.default_rng(3).normal(0.0, 1.0, 100)
    disagrees = scores > np.sort(scores)[59]  # the top 40 samples: a 40% rate, which no cap may cut
    suspects = suspected_set(scores, 0.0, disagrees, estimator="separated")
    assert suspects.estimated_noise_rate == pytest.approx(0.4)
    assert not suspects.noise_rate_capped
    assert suspects.suspected.sum() == 40
    assert np.all(np.diff(suspects.noise_probability[np.argsort(scores)]) >= 0)


def test_the_rate_estimator_follows_the_input_and_then_the_score() -> None:
    assert rate_estimator("aum", images=True) == "separated"
    assert rate_estimator("loss_margin", images=True) == "separated"
    assert rate_estimator("o2u_loss", images=True) == "mixture"
    for score in ("aum", "loss_margin", "o2u_loss"):
        assert rate_estimator(score, images=False) == "confident"
        assert rate_score(score, images=False) == score
    # A separated estimate always fits the margins, whichever score ranks.
    assert rate_score("loss_margin", images=True) == "aum"
    assert rate_score("aum", images=True) == "aum"
    assert rate_score("o2u_loss", images=True) == "o2u_loss"


def test_the_confident_estimator_is_the_share_of_confidently_disagreeing_labels() -> None:
    rng = np.random.default_rng(5)
    scores = rng.normal(0.0, 1.0, 1000)
    disagrees = scores + rng.normal(0.0, 0.5, 1000) > 1.2  # flags that mostly sit at high scores
    suspects = suspected_set(scores, 0.0, disagrees, estimator="confident")
    assert suspects.estimated_noise_rate == disagrees.mean()
    assert not suspects.noise_rate_capped
    # The suspects are the top of the score's ranking, and the probability rises with the score
    # and averages to the rate.
    top = np.argsort(-scores, kind="stable")[: round(disagrees.mean() * 1000)]
    assert set(np.flatnonzero(suspects.suspected)) == set(top)
    assert np.all(np.diff(suspects.noise_probability[np.argsort(scores, kind="stable")]) >= 0)
    assert suspects.noise_probability.mean() == pytest.approx(disagrees.mean())
    # Even a bimodal score with a clear minority group does not override the count.
    bimodal = np.concatenate([rng.normal(-3.0, 1.0, 700), rng.normal(3.0, 1.0, 300)])
    agreed = np.zeros(1000, dtype=bool)
    assert suspected_set(bimodal, 0.0, agreed, estimator="confident").estimated_noise_rate == 0.0
    assert estimate_noise(bimodal).rate == pytest.approx(0.3, abs=0.02)
    for estimator in ("confident", "separated"):
        with pytest.raises(ValueError, match="needs the confident disagreement"):
            suspected_set(scores, 0.0, None, estimator=estimator)


def test_cyclic_suspects_are_the_suspected_set_of_the_score_kinds_estimator() -> None:
    rng = np.random.default_rng(6)
    labels = np.arange(400) % 4
    losses = np.concatenate([rng.gamma(2.0, 0.1, 340), rng.normal(2.0, 0.3, 60)])
    counts = np.zeros((400, 4), dtype=np.int32)
    counts[np.arange(400), labels] = 5
    counts[330:] = 0
    counts[np.arange(330, 400), (labels[330:] + 1) % 4] = 5  # 70 voted elsewhere, 60 of them high losses
    disagrees = confident_disagreement(counts, labels)
    cases = [("aum", True, "separated"), ("o2u_loss", True, "mixture")]
    cases += [(score, False, "confident") for score in ("aum", "o2u_loss", "loss_margin")]
    for score, images, estimator in cases:
        got = cyclic_suspects(losses, counts, labels, score=score, images=images, noise_rate=0.0)
        want = suspected_set(losses, 0.0, disagrees, estimator=estimator)
        assert got.estimated_noise_rate == want.estimated_noise_rate
        np.testing.assert_array_equal(got.suspected, want.suspected)
        np.testing.assert_array_equal(got.noise_probability, want.noise_probability)
    features = cyclic_suspects(losses, counts, labels, score="loss_margin", images=False, noise_rate=0.0)
    assert features.estimated_noise_rate == 0.175
    fixed = cyclic_suspects(losses, counts, labels, score="aum", images=True, noise_rate=0.1)
    assert fixed.noise_rate_used == 0.1
    assert fixed.suspected.sum() == 40


def test_a_separated_estimate_of_other_scores_ranks_by_the_given_scores() -> None:
    """loss_margin on images: the rate is the margins' separated mixture, the suspects are the top
    of the loss-margin ranking, and the probability rises with that ranking's score."""
    rng = np.random.default_rng(7)
    margins = np.concatenate([rng.normal(-3.0, 1.0, 850), rng.normal(3.0, 1.0, 150)])  # D about 6
    ranking = margins + rng.normal(0.0, 1.5, 1000)  # another order of the same samples
    labels = np.arange(1000) % 4
    counts = np.zeros((1000, 4), dtype=np.int32)
    counts[np.arange(1000), labels] = 5
    suspects = cyclic_suspects(
        ranking, counts, labels, score="loss_margin", images=True, noise_rate=0.0, rate_scores=margins
    )
    separated = estimate_separated(margins, np.zeros(1000, dtype=bool))
    assert suspects.estimated_noise_rate == separated.rate
    assert suspects.estimated_noise_rate == pytest.approx(0.15, abs=0.01)
    top = np.argsort(-ranking, kind="stable")[: round(separated.rate * 1000)]
    assert set(np.flatnonzero(suspects.suspected)) == set(top)
    assert np.all(np.diff(suspects.noise_probability[np.argsort(ranking, kind="stable")]) >= 0)
    assert suspects.noise_probability.mean() == pytest.approx(separated.probability.mean())


def test_the_separated_estimator_takes_a_separated_mixture() -> None:
    rng = np.random.default_rng(4)
    scores = np.concatenate([rng.normal(-3.0, 1.0, 850), rng.normal(3.0, 1.0, 150)])  # D about 6
    mixture = fit_two_gaussians(scores)
    assert mixture is not None
    assert separation(mixture) > 5
    disagrees = np.zeros(1000, dtype=bool)  # what the votes say does not matter here
    probability, rate, capped = estimate_separated(scores, disagrees)
    assert rate == pytest.approx(0.15, abs=0.01)
    assert not capped
    assert np.all(np.diff(probability[np.argsort(scores)]) >= 0)
    assert probability[850:].mean() > 0.95
    # Closer means: D below 2, so the confident disagreement decides, even though EM finds a split.
    close = np.concatenate([rng.normal(-0.5, 1.0, 850), rng.normal(0.5, 1.0, 150)])
    close_mixture = fit_two_gaussians(close)
    assert close_mixture is not None
    assert separation(close_mixture) < 2
    flagged = np.zeros(1000, dtype=bool)
    flagged[-60:] = True
    assert estimate_separated(close, flagged).rate == pytest.approx(0.06)
    # A separated majority "noisy" group is no noise rate either.
    majority = np.concatenate([rng.normal(-3.0, 1.0, 300), rng.normal(3.0, 1.0, 700)])
    assert estimate_separated(majority, flagged).rate == pytest.approx(0.06)
