"""The engine's result types: per-epoch progress, stage-3 accuracies and the noise report.

A NoiseReport carries everything a reviewer or a labeling vendor's acceptance check needs (per
sample score, rank, probability, suggested fix; per class and pairwise summaries) together with
what produced it (resolved config, seed, versions, device), so a result can be reproduced.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from o2u_engine.config import ResolvedConfig


@dataclass(frozen=True)
class ProgressEvent:
    """Figures of one finished epoch, handed to the `progress` callback."""

    stage: str  # "pretraining" | "cyclic" | "clean_retraining"
    epoch: int  # 1-based within the stage
    epochs_total: int  # epochs in the stage
    fraction_done: float  # of all training epochs of the run, 0..1
    mean_loss: float  # mean training cross-entropy of the epoch, nats
    learning_rate: float  # of the epoch
    samples_per_second: float  # training throughput of the epoch
    eta_seconds: float  # estimated time to finish training


@dataclass(frozen=True)
class CleanRetrainingResult:
    """Stage 3: accuracy on the held-out split of a model trained with and without the suspects.

    Accuracy is measured against the given labels of the held-out samples that are not
    themselves suspected (their labels are the ones the report trusts); when every held-out
    sample is suspected, against all of them.
    """

    accuracy_without_removal: float  # fraction in [0, 1]
    accuracy_with_removal: float  # fraction in [0, 1]
    removed: int  # suspected samples dropped from the training split
    validation_samples: int  # held-out samples the accuracies are measured on


@dataclass
class NoiseReport:
    """Per-sample noise scores and the dataset-level summary of one O2U-Net run (N samples, K classes)."""

    noise_scores: np.ndarray  # (N,) float64, config.score's (see CyclicStatistics.scores); never NaN
    score_variance: np.ndarray  # (N,) float64, population variance of the normalized loss
    ranks: np.ndarray  # (N,) int64, 1 = most suspicious; ties broken by sample index
    noise_probability: np.ndarray  # (N,) float64 in [0, 1]
    suspected: np.ndarray  # (N,) bool, the top round(noise_rate_used * N) ranks
    labels: np.ndarray  # (N,) int64, the given labels
    # (N,) int64: the likeliest class by the cyclic epochs' mean softmax; for a suspect, the
    # likeliest other than its given label
    suggested_labels: np.ndarray
    suggested_label_confidence: np.ndarray  # (N,) float64, that class's mean softmax probability
    num_classes: int
    estimated_noise_rate: float  # in [0, 0.5]
    noise_rate_used: float  # config.noise_rate if given, else estimated_noise_rate
    class_counts: np.ndarray  # (K,) int64, samples given each label
    class_suspected: np.ndarray  # (K,) int64, suspected samples given each label
    class_noise_rates: np.ndarray  # (K,) float64, class_suspected / class_counts (0 for empty classes)
    transition_matrix: np.ndarray  # (K, K) float64, given x suggested over suspects; rows sum to 1
    clean_retraining: CleanRetrainingResult | None
    config: ResolvedConfig
    seed: int
    engine_version: str
    torch_version: str
    device: str  # e.g. "cpu", "cuda:0"
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, and "total"
    # The losses' mixture (o2u_loss on images) put most samples in its high group: the rate is
    # rank.estimate_noise's fallback (the confident disagreement), not the mixture's weight
    noise_rate_capped: bool = False

    @property
    def num_samples(self) -> int:
        return int(self.noise_scores.shape[0])

    def order(self) -> np.ndarray:
        """Sample indices sorted by rank, most suspicious first, (N,) int64."""
        order = np.empty_like(self.ranks)
        order[self.ranks - 1] = np.arange(self.ranks.shape[0], dtype=np.int64)
        return order

    def config_json(self) -> str:
        """The resolved configuration as JSON (sorted keys)."""
        return self.config.to_json()
