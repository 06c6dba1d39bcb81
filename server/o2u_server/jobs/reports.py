"""Turn the engine's NoiseReport into what the store keeps: ranked score rows, a dataset summary
and the run information that makes the result reproducible."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import o2u_engine
from o2u_server.domain import (
    ClassNoise,
    CleanRetrainingInfo,
    ConfusedPair,
    DatasetSummary,
    RunInfo,
    ScoreTuple,
)

__all__ = ["MAX_CONFUSED_PAIRS", "run_info", "score_rows", "summary"]

MAX_CONFUSED_PAIRS = 20


def run_info(report: o2u_engine.NoiseReport, *, num_samples: int, server_version: str) -> RunInfo:
    return RunInfo(
        seed=int(report.seed),
        engine_version=report.engine_version,
        torch_version=report.torch_version,
        device=report.device,
        num_samples=num_samples,
        num_classes=int(report.num_classes),
        resolved_config_json=report.config_json(),
        server_version=server_version,
        model=str(report.config.model),
    )


def score_rows(report: o2u_engine.NoiseReport, keys: list[str]) -> Iterator[ScoreTuple]:
    """One row per sample, most suspicious first, in the store's column order."""
    order = report.order().tolist()
    # tolist() once per array: indexing NumPy scalars per sample would dominate for large N.
    ranks = report.ranks.tolist()
    labels = report.labels.tolist()
    scores = report.noise_scores.tolist()
    variances = report.score_variance.tolist()
    probabilities = report.noise_probability.tolist()
    suspected = report.suspected.tolist()
    suggested = report.suggested_labels.tolist()
    confidences = report.suggested_label_confidence.tolist()
    for i in order:
        yield (
            int(ranks[i]),
            int(i),
            keys[i],
            int(labels[i]),
            float(scores[i]),
            float(variances[i]),
            float(probabilities[i]),
            bool(suspected[i]),
            int(suggested[i]),
            float(confidences[i]),
        )


def _confused_pairs(report: o2u_engine.NoiseReport) -> list[ConfusedPair]:
    mask = report.suspected & (report.labels != report.suggested_labels)
    pairs = Counter(zip(report.labels[mask].tolist(), report.suggested_labels[mask].tolist(), strict=True))
    ranked = sorted(pairs.items(), key=lambda item: (-item[1], item[0]))
    return [
        ConfusedPair(int(given), int(suggested), count)
        for (given, suggested), count in ranked[:MAX_CONFUSED_PAIRS]
    ]


def summary(
    report: o2u_engine.NoiseReport, *, job_id: str, class_names: list[str], info: RunInfo
) -> DatasetSummary:
    classes = [
        ClassNoise(
            label=label,
            name=class_names[label] if label < len(class_names) else str(label),
            count=int(report.class_counts[label]),
            suspected=int(report.class_suspected[label]),
            noise_rate=float(report.class_noise_rates[label]),
        )
        for label in range(int(report.num_classes))
    ]
    retraining = CleanRetrainingInfo()
    if report.clean_retraining is not None:
        result = report.clean_retraining
        retraining = CleanRetrainingInfo(
            ran=True,
            accuracy_without_removal=float(result.accuracy_without_removal),
            accuracy_with_removal=float(result.accuracy_with_removal),
            removed=int(result.removed),
        )
    return DatasetSummary(
        job_id=job_id,
        num_samples=len(report.labels),
        num_classes=int(report.num_classes),
        class_names=list(class_names),
        estimated_noise_rate=float(report.estimated_noise_rate),
        noise_rate_used=float(report.noise_rate_used),
        num_suspected=int(report.suspected.sum()),
        classes=classes,
        transition_matrix=[float(value) for value in report.transition_matrix.reshape(-1)],
        confused_pairs=_confused_pairs(report),
        clean_retraining=retraining,
        run_info=info,
    )
