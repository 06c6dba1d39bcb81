"""Running per-sample statistics of stage 2: Welford mean/variance of the normalized loss and
counts of the predicted classes, kept on the device in O(N) (and O(N K) for predictions) memory.

Each cyclic epoch contributes one loss per sample. Subtracting the epoch's mean loss (over all
samples, or within each given class) makes epochs trained at different learning rates
comparable; Welford's update keeps the mean and the sum of squared deviations without storing
the epochs, so memory does not grow with their number.
"""

from __future__ import annotations

import torch


class CyclicStatistics:
    """Per-sample accumulators for the cyclic stage; all tensors live on `device`."""

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
        self.class_sizes = torch.bincount(labels, minlength=num_classes).to(torch.float64)  # (K,)

    def record_predictions(self, indices: torch.Tensor, predicted: torch.Tensor) -> None:
        """Count one prediction for each sample of a batch; indices are unique within a batch."""
        ones = torch.ones_like(indices, dtype=torch.int32)
        self.prediction_counts.index_put_((indices, predicted), ones, accumulate=True)

    def add_epoch(self, epoch_losses: torch.Tensor) -> None:
        """Fold in one epoch of per-sample losses (N,), normalized by the epoch (or class) mean."""
        losses = epoch_losses.to(torch.float64)
        if self.class_aware:
            class_sums = torch.zeros(self.num_classes, dtype=torch.float64, device=losses.device)
            class_sums.index_add_(0, self.labels, losses)
            class_means = class_sums / self.class_sizes.clamp(min=1.0)  # (K,)
            normalized = losses - class_means[self.labels]
        else:
            normalized = losses - losses.mean()
        self.epochs += 1
        delta = normalized - self.mean
        self.mean += delta / self.epochs
        self.m2 += delta * (normalized - self.mean)

    def variance(self) -> torch.Tensor:
        """Population variance of the normalized loss over the epochs folded in so far, (N,)."""
        return self.m2 / max(self.epochs, 1)

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        return {
            "epochs": self.epochs,
            "mean": self.mean.cpu(),
            "m2": self.m2.cpu(),
            "prediction_counts": self.prediction_counts.cpu(),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor | int]) -> None:
        epochs = state["epochs"]
        assert isinstance(epochs, int)
        self.epochs = epochs
        for name, target in (
            ("mean", self.mean),
            ("m2", self.m2),
            ("prediction_counts", self.prediction_counts),
        ):
            source = state[name]
            assert isinstance(source, torch.Tensor)
            target.copy_(source)
