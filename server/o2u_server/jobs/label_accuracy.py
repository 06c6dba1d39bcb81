"""The label-accuracy estimates of a job's summary, overall and per class.

`with_label_accuracy(summary, report)` fills `DatasetSummary.label_accuracy` and each class's
`label_accuracy` from the report's per-sample noise probabilities (o2u_engine.accuracy: a
Poisson-binomial count of wrong labels, exact up to 4096 samples, else the normal approximation;
95% central interval). Acceptance gates in the clients read these.
"""

from __future__ import annotations

import dataclasses

import o2u_engine
from o2u_engine.accuracy import AccuracyEstimate, label_accuracy, per_class_label_accuracy
from o2u_server.domain import DatasetSummary, LabelAccuracy

__all__ = ["with_label_accuracy"]


def _domain(estimate: AccuracyEstimate) -> LabelAccuracy:
    return LabelAccuracy(
        mean=estimate.mean,
        lower=estimate.lower,
        upper=estimate.upper,
        level=estimate.level,
        method=estimate.method,
        num_samples=estimate.num_samples,
    )


def with_label_accuracy(summary: DatasetSummary, report: o2u_engine.NoiseReport) -> DatasetSummary:
    per_class = per_class_label_accuracy(report.noise_probability, report.labels, report.num_classes)
    classes = [
        dataclasses.replace(c, label_accuracy=_domain(per_class[c.label])) if c.label < len(per_class) else c
        for c in summary.classes
    ]
    overall = _domain(label_accuracy(report.noise_probability))
    return dataclasses.replace(summary, classes=classes, label_accuracy=overall)
