"""Running per-sample statistics of stage 2: Welford mean/variance of the normalized loss, counts
of the predicted classes, the summed softmax probabilities and the summed margins (AUM), kept on
the device in O(N) (and O(N K) for the predictions and probabilities) memory.

Each cyclic epoch contributes one output per sample: the training steps `record` each batch's
per-sample losses and logits into this epoch's buffers, and `end_epoch` folds the whole epoch in
at once - the one place that sees every sample's outputs of an epoch. Subtracting the epoch's
mean loss (over all samples, or within each given class) makes epochs trained at different
learning rates comparable; Welford's update keeps the mean and the sum of squared deviations
without storing the epochs, so memory does not grow with their number.
"""

from __future__ import annotations

import numpy as np
import torch

from o2u_engine.rank import rate_score

# Device bytes per (sample, class) pair while the cyclic stage runs: the int32 vote counts, the
# float32 probability sums and this epoch's float16 probabilities (tested against the buffers
# themselves), for a service to bound before it trains.
STATE_BYTES_PER_SAMPLE_CLASS = 4 + 4 + 2


class CyclicStatistics:
    """Per-sample accumulators for the cyclic stage, on the device of `labels`."""

    def __init__(self, labels: torch.Tensor, num_classes: int, *, class_aware: bool) -> None:
        num_samples = labels.shape[0]
        device = labels.device
        self.labels = labels  # (N,) int64
        self.num_classes = num_classes
        self.class_aware = class_aware
        self.epochs = 0  # cyclic epochs folded in
        # Welford accumulators of the normalized loss: mean and sum of squared deviations, (N,) each
        self.mean = torch.zeros(num_samples, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(num_samples, dtype=torch.float64, device=device)
        # How often each class was predicted for each sample, (N, K)
        self.prediction_counts = torch.zeros(num_samples, num_classes, dtype=torch.int32, device=device)
        # Sum over the cyclic epochs of each sample's softmax probabilities, (N, K): where the
        # suggested labels come from
        self.probability_sum = torch.zeros(num_samples, num_classes, dtype=torch.float32, device=device)
        self.class_sizes = torch.bincount(labels, minlength=num_classes).to(torch.float64)  # (K,)
        # This epoch's outputs, (N,) each, filled batch by batch; not checkpointed, since a
        # checkpoint is taken between epochs
        self.epoch_losses = torch.zeros(num_samples, dtype=torch.float32, device=device)
        self.epoch_predictions = torch.zeros(num_samples, dtype=torch.int64, device=device)
        self.epoch_margins = torch.zeros(num_samples, dtype=torch.float32, device=device)
        # (N, K) in half precision: a probability needs no more digits than its sum's
        self.epoch_probabilities = torch.zeros(num_samples, num_classes, dtype=torch.float16, device=device)
        # Sum over the cyclic epochs of the margin: given-label logit minus the largest other, (N,)
        self.margin_sum = torch.zeros(num_samples, dtype=torch.float64, device=device)

    def record(self, indices: torch.Tensor, losses: torch.Tensor, logits: torch.Tensor) -> None:
        """One batch's outputs: losses (B,) and logits (B, K) of the samples `indices` (B,).

        Every sample is recorded exactly once per epoch, so no buffer is ever reset."""
        self.epoch_losses[indices] = losses
        self.epoch_predictions[indices] = logits.argmax(dim=1)
        logits = logits.float()
        self.epoch_probabilities[indices] = logits.softmax(dim=1).to(torch.float16)
        given = self.labels[indices]  # (B,)
        given_logit = logits.gather(1, given[:, None])[:, 0]  # (B,)
        others = logits.scatter(1, given[:, None], float("-inf"))  # (B, K), the given class masked
        self.epoch_margins[indices] = given_logit - others.max(dim=1).values

    def end_epoch(self) -> None:
        """Fold in the recorded epoch: count each sample's predicted class, and update the
        accumulators with its loss normalized by the epoch (or class) mean."""
        predicted = self.epoch_predictions.unsqueeze(1)  # (N, 1)
        self.prediction_counts.scatter_add_(1, predicted, torch.ones_like(predicted, dtype=torch.int32))
        self.probability_sum += self.epoch_probabilities
        losses = self.epoch_losses.to(torch.float64)
        if self.class_aware:
            class_sums = torch.zeros(self.num_classes, dtype=torch.float64, device=losses.device)
            class_sums.index_add_(0, self.labels, losses)
            class_means = class_sums / self.class_sizes.clamp(min=1.0)  # (K,)
            normalized = losses - class_means[self.labels]
        else:
            normalized = losses - losses.mean()
        self.epochs += 1
        self.margin_sum += self.epoch_margins.to(torch.float64)
        delta = normalized - self.mean
        self.mean += delta / self.epochs
        self.m2 += delta * (normalized - self.mean)

    def variance(self) -> torch.Tensor:
        """Population variance of the normalized loss over the epochs folded in so far, (N,)."""
        return self.m2 / max(self.epochs, 1)

    def mean_probabilities(self) -> torch.Tensor:
        """Mean softmax probability of every class over the epochs folded in so far, (N, K)."""
        return self.probability_sum / max(self.epochs, 1)

    def mean_margin(self) -> torch.Tensor:
        """Mean margin over the epochs folded in so far (AUM), (N,); low means suspicious."""
        return self.margin_sum / max(self.epochs, 1)

    def scores(self, kind: str) -> torch.Tensor:
        """The per-sample noise score of `kind` (config.NOISE_SCORES), (N,), higher = more suspect:
        the mean normalized loss (`o2u_loss`), the negated mean margin (`aum`), or the mean of a
        sample's ranks by those two divided by N (`loss_margin`, in (0, 1])."""
        if kind == "o2u_loss":
            return self.mean
        if kind == "aum":
            return -self.mean_margin()
        if kind == "loss_margin":
            count = max(self.mean.shape[0], 1)
            return (average_ranks(self.mean) + average_ranks(-self.mean_margin())) / (2 * count)
        raise ValueError(f"unknown noise score {kind!r}")

    def rate_scores(self, kind: str, *, images: bool) -> np.ndarray | None:
        """On the host, the scores the noise-rate estimator of the `kind` score fits when they are
        not that score's own (rank.rate_score: the margins for `loss_margin` on images); else None."""
        fitted = rate_score(kind, images=images)
        return None if fitted == kind else self.scores(fitted).cpu().numpy()

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        return {
            "epochs": self.epochs,
            "mean": self.mean.cpu(),
            "m2": self.m2.cpu(),
            "prediction_counts": self.prediction_counts.cpu(),
            "probability_sum": self.probability_sum.cpu(),
            "margin_sum": self.margin_sum.cpu(),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor | int]) -> None:
        epochs = state["epochs"]
        assert isinstance(epochs, int)
        self.epochs = epochs
        for name, target in (
            ("mean", self.mean),
            ("m2", self.m2),
            ("prediction_counts", self.prediction_counts),
            ("probability_sum", self.probability_sum),
            ("margin_sum", self.margin_sum),
        ):
            source = state[name]
            assert isinstance(source, torch.Tensor)
            target.copy_(source)


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1..N of `values` (N,) in ascending order as float64, equal values sharing the mean of
    their ranks (scipy's `rankdata`, method "average"), on the values' device."""
    ordered, order = torch.sort(values, stable=True)
    _, group, sizes = torch.unique_consecutive(ordered, return_inverse=True, return_counts=True)
    last = torch.cumsum(sizes, dim=0).to(torch.float64)  # (G,) 1-based rank of each group's last
    group_ranks = last - (sizes.to(torch.float64) - 1) / 2  # (G,) mean rank of each group
    ranks = torch.empty(values.shape[0], dtype=torch.float64, device=values.device)
    ranks[order] = group_ranks[group]
    return ranks
