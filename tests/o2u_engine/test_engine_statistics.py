"""The cyclic statistics: batches recorded into the epoch's buffers, folded in once per epoch."""

from __future__ import annotations

import pytest
import torch

from o2u_engine.statistics import STATE_BYTES_PER_SAMPLE_CLASS, CyclicStatistics, average_ranks

LABELS = torch.tensor([0, 0, 1, 1])
LOGITS = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0]])  # predicts 0, 1, 1, 0


def record_epoch(statistics: CyclicStatistics, losses: list[float]) -> None:
    """One epoch in two batches, in a shuffled order, as the training steps record it."""
    for batch in (torch.tensor([3, 1]), torch.tensor([0, 2])):
        statistics.record(batch, torch.tensor(losses)[batch], LOGITS[batch])
    statistics.end_epoch()


def test_each_epoch_is_normalized_by_its_mean_and_averaged_over_epochs() -> None:
    statistics = CyclicStatistics(LABELS, 2, class_aware=False)
    record_epoch(statistics, [1.0, 2.0, 1.0, 4.0])  # mean 2: normalized -1, 0, -1, 2
    assert statistics.mean.tolist() == [-1.0, 0.0, -1.0, 2.0]
    record_epoch(statistics, [3.0, 3.0, 3.0, 3.0])  # normalized 0 everywhere
    assert statistics.epochs == 2
    assert statistics.mean.tolist() == [-0.5, 0.0, -0.5, 1.0]
    assert statistics.variance().tolist() == pytest.approx([0.25, 0.0, 0.25, 1.0])
    assert statistics.prediction_counts.tolist() == [[2, 0], [0, 2], [0, 2], [2, 0]]


def test_class_aware_normalization_subtracts_each_class_mean() -> None:
    statistics = CyclicStatistics(LABELS, 2, class_aware=True)
    record_epoch(statistics, [1.0, 3.0, 5.0, 7.0])  # class means 2 and 6
    assert statistics.mean.tolist() == [-1.0, 1.0, -1.0, 1.0]


def test_the_state_round_trips_between_epochs() -> None:
    statistics = CyclicStatistics(LABELS, 2, class_aware=False)
    record_epoch(statistics, [1.0, 2.0, 1.0, 4.0])
    restored = CyclicStatistics(LABELS, 2, class_aware=False)
    restored.load_state_dict(statistics.state_dict())
    for one in (statistics, restored):
        record_epoch(one, [2.0, 1.0, 1.0, 4.0])
    assert torch.equal(restored.mean, statistics.mean)
    assert torch.equal(restored.m2, statistics.m2)
    assert torch.equal(restored.prediction_counts, statistics.prediction_counts)
    assert torch.equal(restored.margin_sum, statistics.margin_sum)
    assert torch.equal(restored.probability_sum, statistics.probability_sum)
    assert restored.probability_sum.abs().sum() > 0


def test_mean_probabilities_average_each_epochs_softmax() -> None:
    statistics = CyclicStatistics(LABELS, 2, class_aware=False)
    record_epoch(statistics, [1.0, 1.0, 1.0, 1.0])
    # A batch recorded again in the same epoch (a retried step) replaces its first outputs.
    statistics.record(torch.tensor([0]), torch.tensor([1.0]), torch.tensor([[0.0, 0.0]]))
    statistics.record(torch.tensor([0]), torch.tensor([1.0]), LOGITS[:1])
    statistics.end_epoch()
    expected = LOGITS.softmax(dim=1)
    # The epoch's probabilities are kept in half precision until they are folded in.
    torch.testing.assert_close(statistics.mean_probabilities(), expected, atol=1e-3, rtol=0)
    torch.testing.assert_close(statistics.mean_probabilities().sum(dim=1), torch.ones(4), atol=2e-3, rtol=0)


def test_the_per_class_state_is_the_size_the_server_checks() -> None:
    num_samples, num_classes = 5, 7  # neither 1 nor equal, so a (N,) or (K,) buffer cannot pass for (N, K)
    statistics = CyclicStatistics(torch.arange(num_samples) % 2, num_classes, class_aware=False)
    per_class = sum(
        value.numel() * value.element_size()
        for value in vars(statistics).values()
        if isinstance(value, torch.Tensor) and value.shape == (num_samples, num_classes)
    )
    assert (
        per_class
        == STATE_BYTES_PER_SAMPLE_CLASS * num_samples * num_classes
        == 10 * num_samples * num_classes
    )


def test_margins_are_the_given_logit_minus_the_largest_other_averaged_over_epochs() -> None:
    statistics = CyclicStatistics(LABELS, 2, class_aware=False)
    record_epoch(statistics, [1.0, 1.0, 1.0, 1.0])
    assert statistics.mean_margin().tolist() == [2.0, -1.0, 3.0, -1.0]
    record_epoch(statistics, [1.0, 1.0, 1.0, 1.0])
    assert statistics.mean_margin().tolist() == [2.0, -1.0, 3.0, -1.0]
    # aum ranks the negated margin (higher = more suspect); o2u_loss the mean normalized loss
    assert statistics.scores("aum").tolist() == [-2.0, 1.0, -3.0, 1.0]
    assert torch.equal(statistics.scores("o2u_loss"), statistics.mean)


def test_the_loss_margin_score_is_the_mean_rank_of_the_two_over_n() -> None:
    statistics = CyclicStatistics(LABELS, 2, class_aware=False)
    record_epoch(statistics, [0.5, 2.0, 0.1, 1.0])
    loss_ranks = average_ranks(statistics.mean)  # losses 0.5, 2.0, 0.1, 1.0 -> 2, 4, 1, 3
    margin_ranks = average_ranks(statistics.scores("aum"))  # -2, 1, -3, 1 -> 2, 3.5, 1, 3.5
    assert loss_ranks.tolist() == [2.0, 4.0, 1.0, 3.0]
    assert margin_ranks.tolist() == [2.0, 3.5, 1.0, 3.5]
    assert statistics.scores("loss_margin").tolist() == [0.5, 7.5 / 8, 0.25, 6.5 / 8]
    with pytest.raises(ValueError, match="unknown noise score 'loss'"):
        statistics.scores("loss")
    # loss_margin's separated rate on images fits the margins; every other estimate its own score
    margins = statistics.rate_scores("loss_margin", images=True)
    assert margins is not None
    assert margins.tolist() == statistics.scores("aum").tolist()
    assert statistics.rate_scores("loss_margin", images=False) is None
    assert statistics.rate_scores("aum", images=True) is None
    assert statistics.rate_scores("o2u_loss", images=True) is None


def test_average_ranks_share_ties_like_scipy() -> None:
    values = torch.tensor([3.0, 1.0, 2.0, 2.0, 5.0, 1.0, 2.0], dtype=torch.float64)
    assert average_ranks(values).tolist() == [6.0, 1.5, 4.0, 4.0, 7.0, 1.5, 4.0]
    assert average_ranks(torch.zeros(0, dtype=torch.float64)).shape == (0,)
