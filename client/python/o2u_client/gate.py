"""Accept or reject a batch from its dataset summary: the acceptance gate of `o2u score`.

`gate_verdict(summary, max_noise_rate=..., min_label_accuracy=...)` compares the batch's expected
label accuracy (`DatasetSummary.label_accuracy.mean`, the mean of the Poisson-binomial count of
wrong labels given the per-sample noise probabilities) with the thresholds: the batch passes when
the accuracy is at least `min_label_accuracy` and the noise rate (1 - accuracy) at most
`max_noise_rate`. The decision reads the point estimate; the 95% interval is reported with it so a
pipeline can see how sure it is. A summary from a server without the estimate falls back to
`estimated_label_accuracy` with an interval of that one point. `o2u score` exits with
`EXIT_GATE_FAILED` (20) when the verdict is a rejection.
"""

from __future__ import annotations

from dataclasses import dataclass

from o2u_client.results import DatasetSummary

__all__ = ["EXIT_GATE_FAILED", "ClassVerdict", "GateVerdict", "gate_verdict"]

EXIT_GATE_FAILED = 20


@dataclass(frozen=True)
class ClassVerdict:
    label: int
    name: str
    label_accuracy: float
    lower: float
    upper: float
    passed: bool


@dataclass(frozen=True)
class GateVerdict:
    """The gate's decision: `passed`, the accuracy with its interval, and what was required."""

    passed: bool
    label_accuracy: float
    lower: float
    upper: float
    level: float
    noise_rate: float
    max_noise_rate: float | None
    min_label_accuracy: float | None
    reasons: list[str]
    classes: list[ClassVerdict]

    def describe(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        text = (
            f"gate {verdict}: label accuracy {self.label_accuracy:.2%} "
            f"({self.level:.0%} interval {self.lower:.2%}-{self.upper:.2%}), noise rate {self.noise_rate:.2%}"
        )
        return text + ("" if self.passed else "; " + "; ".join(self.reasons))


def _required(accuracy: float, max_noise_rate: float | None, min_label_accuracy: float | None) -> list[str]:
    reasons = []
    if min_label_accuracy is not None and accuracy < min_label_accuracy:
        reasons.append(f"label accuracy {accuracy:.2%} is below the minimum {min_label_accuracy:.2%}")
    if max_noise_rate is not None and 1.0 - accuracy > max_noise_rate:
        reasons.append(f"noise rate {1.0 - accuracy:.2%} is above the maximum {max_noise_rate:.2%}")
    return reasons


def gate_verdict(
    summary: DatasetSummary, *, max_noise_rate: float | None = None, min_label_accuracy: float | None = None
) -> GateVerdict:
    """The verdict on a finished job's summary; thresholds left None are not checked."""
    for name, value in (("max_noise_rate", max_noise_rate), ("min_label_accuracy", min_label_accuracy)):
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1, got {value}")
    estimate = summary.label_accuracy
    if estimate is None:
        mean = lower = upper = summary.estimated_label_accuracy
        level = 0.0
    else:
        mean, lower, upper, level = estimate.mean, estimate.lower, estimate.upper, estimate.level
    classes = [
        ClassVerdict(
            c.label,
            c.name,
            c.label_accuracy.mean,
            c.label_accuracy.lower,
            c.label_accuracy.upper,
            not _required(c.label_accuracy.mean, max_noise_rate, min_label_accuracy),
        )
        for c in summary.classes
        if c.label_accuracy is not None
    ]
    reasons = _required(mean, max_noise_rate, min_label_accuracy)
    return GateVerdict(
        passed=not reasons,
        label_accuracy=mean,
        lower=lower,
        upper=upper,
        level=level,
        noise_rate=1.0 - mean,
        max_noise_rate=max_noise_rate,
        min_label_accuracy=min_label_accuracy,
        reasons=reasons,
        classes=classes,
    )
