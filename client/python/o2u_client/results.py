"""Frozen result types of finished jobs: noise scores, the dataset summary, pages and exports,
converted from the protocol's messages (the summary keeps its message as `.raw`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from o2u.v1 import scoring_pb2
from o2u_client.models import Job, RunInfo

__all__ = [
    "ClassNoise",
    "CleanRetraining",
    "ConfusedPair",
    "DatasetSummary",
    "ExportResult",
    "JobPage",
    "LabelAccuracy",
    "NoiseScore",
    "ScorePage",
]


@dataclass(frozen=True)
class NoiseScore:
    """One sample's result; a higher score means more likely mislabeled."""

    sample_id: int
    key: str
    rank: int  # 1 = most suspicious
    score: float
    score_variance: float
    noise_probability: float
    suspected: bool
    given_label: int
    given_label_name: str
    suggested_label: int
    suggested_label_name: str
    suggested_label_confidence: float

    @classmethod
    def from_proto(cls, proto: scoring_pb2.NoiseScore) -> NoiseScore:
        return cls(
            sample_id=proto.sample_id,
            key=proto.key,
            rank=proto.rank,
            score=proto.score,
            score_variance=proto.score_variance,
            noise_probability=proto.noise_probability,
            suspected=proto.suspected,
            given_label=proto.given_label,
            given_label_name=proto.given_label_name,
            suggested_label=proto.suggested_label,
            suggested_label_name=proto.suggested_label_name,
            suggested_label_confidence=proto.suggested_label_confidence,
        )


@dataclass(frozen=True)
class LabelAccuracy:
    """Expected label accuracy and its central interval at `level` (`method`: exact or normal)."""

    mean: float
    lower: float
    upper: float
    level: float
    method: str
    num_samples: int

    @classmethod
    def from_proto(cls, proto: scoring_pb2.LabelAccuracyEstimate) -> LabelAccuracy:
        return cls(proto.mean, proto.lower, proto.upper, proto.level, proto.method, proto.num_samples)


@dataclass(frozen=True)
class ClassNoise:
    label: int
    name: str
    count: int
    suspected: int
    noise_rate: float
    label_accuracy: LabelAccuracy | None = None


@dataclass(frozen=True)
class ConfusedPair:
    given_label: int
    suggested_label: int
    count: int


@dataclass(frozen=True)
class CleanRetraining:
    ran: bool
    accuracy_without_removal: float
    accuracy_with_removal: float
    removed: int


@dataclass(frozen=True)
class DatasetSummary:
    """Dataset-level health of a finished job."""

    job_id: str
    num_samples: int
    num_classes: int
    class_names: list[str]
    estimated_noise_rate: float
    noise_rate_used: float
    num_suspected: int
    estimated_label_accuracy: float
    classes: list[ClassNoise]
    transition_matrix: list[list[float]]  # [given][believed true], rows sum to 1
    confused_pairs: list[ConfusedPair]
    clean_retraining: CleanRetraining | None
    run_info: RunInfo | None
    raw: scoring_pb2.DatasetSummary = field(repr=False, compare=False)
    # The score mixture could not give the noise rate (its high group held most samples):
    # estimated_noise_rate is the share of labels the network confidently disagreed with instead
    noise_rate_capped: bool = False
    # Expected label accuracy with its 95% interval (None from servers that do not report it)
    label_accuracy: LabelAccuracy | None = None

    @classmethod
    def from_proto(cls, proto: scoring_pb2.DatasetSummary) -> DatasetSummary:
        k = proto.num_classes
        flat = list(proto.transition_matrix)
        matrix = [flat[row * k : (row + 1) * k] for row in range(k)] if k and len(flat) == k * k else []
        retraining = proto.clean_retraining
        return cls(
            job_id=proto.job_id,
            num_samples=proto.num_samples,
            num_classes=k,
            class_names=list(proto.class_names),
            estimated_noise_rate=proto.estimated_noise_rate,
            noise_rate_used=proto.noise_rate_used,
            num_suspected=proto.num_suspected,
            estimated_label_accuracy=proto.estimated_label_accuracy,
            classes=[
                ClassNoise(
                    c.label,
                    c.name,
                    c.count,
                    c.suspected,
                    c.noise_rate,
                    LabelAccuracy.from_proto(c.label_accuracy) if c.HasField("label_accuracy") else None,
                )
                for c in proto.classes
            ],
            transition_matrix=matrix,
            confused_pairs=[
                ConfusedPair(p.given_label, p.suggested_label, p.count) for p in proto.confused_pairs
            ],
            clean_retraining=(
                CleanRetraining(
                    retraining.ran,
                    retraining.accuracy_without_removal,
                    retraining.accuracy_with_removal,
                    retraining.removed,
                )
                if proto.HasField("clean_retraining") and retraining.ran
                else None
            ),
            run_info=RunInfo.from_proto(proto.run_info) if proto.HasField("run_info") else None,
            raw=proto,
            noise_rate_capped=proto.noise_rate_capped,
            label_accuracy=(
                LabelAccuracy.from_proto(proto.label_accuracy) if proto.HasField("label_accuracy") else None
            ),
        )


@dataclass(frozen=True)
class ExportResult:
    destination_uri: str
    rows_written: int
    bytes_written: int


@dataclass(frozen=True)
class ScorePage:
    """One page of ListNoiseScores; `total_size` counts matches across all pages."""

    scores: Sequence[NoiseScore]
    next_page_token: str
    total_size: int


@dataclass(frozen=True)
class JobPage:
    """One page of ListScoringJobs, newest first."""

    jobs: Sequence[Job]
    next_page_token: str
