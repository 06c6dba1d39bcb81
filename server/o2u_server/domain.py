"""The server's domain types: jobs, their events, scores and dataset summaries as plain dataclasses.

The store persists these, the job runner produces them and `converters` maps them to and from the
protobuf messages, so nothing below the servicer ever sees a protobuf. Times are Unix seconds.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ANNOTATION_RULES",
    "TERMINAL_STATES",
    "ClassNoise",
    "CleanRetrainingInfo",
    "ConfusedPair",
    "DatasetFormat",
    "DatasetOptions",
    "DatasetSummary",
    "EventType",
    "ExportFormat",
    "Job",
    "JobError",
    "JobEvent",
    "JobSpec",
    "JobState",
    "LabelStudioOptions",
    "NoiseScoreRow",
    "ParquetOptions",
    "Progress",
    "RunInfo",
    "ScoreFilter",
    "ScorePage",
    "ScoreTuple",
    "SkippedRecords",
    "Stage",
    "WebhookAttempt",
]

# One stored score in the store's column order: (rank, sample_id, key, given_label, score,
# score_variance, noise_probability, suspected, suggested_label, suggested_label_confidence).
ScoreTuple = tuple[int, int, str, int, float, float, float, bool, int, float]


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


class Stage(enum.StrEnum):
    LOADING = "loading"
    PRETRAINING = "pretraining"
    CYCLIC = "cyclic"
    CLEAN_RETRAINING = "clean_retraining"
    RANKING = "ranking"


class EventType(enum.StrEnum):
    STATE_CHANGED = "state_changed"
    PROGRESS = "progress"


class DatasetFormat(enum.StrEnum):
    """How the object(s) behind a dataset URI are read; `o2u_server.datasets.FORMATS` has one row each.

    Names match the proto's DATASET_FORMAT_* values, values are what the store and the CLI use."""

    NPZ = "npz"
    IMAGE_FOLDER = "image_folder"
    CSV_MANIFEST = "csv_manifest"
    JSONL_MANIFEST = "jsonl_manifest"
    PARQUET = "parquet"
    LABEL_STUDIO = "label_studio"


class ExportFormat(enum.StrEnum):
    """File format of exported scores; names match the proto's EXPORT_FORMAT_* values."""

    JSONL = "jsonl"
    CSV = "csv"
    PARQUET = "parquet"
    LABEL_STUDIO = "label_studio"


@dataclass(frozen=True)
class ParquetOptions:
    """Column names of a Parquet dataset as the caller gave them; "" takes the default
    (`datasets.parquet`: label, key, features; no image keys)."""

    label_column: str = ""
    key_column: str = ""
    embedding_column: str = ""
    image_key_column: str = ""  # set: the samples are the images these object keys name


@dataclass(frozen=True)
class LabelStudioOptions:
    """How a Label Studio export is read; "" takes the default (`datasets.label_studio`)."""

    annotation_rule: str = ""  # "latest" or "majority" (ANNOTATION_RULES)
    image_field: str = ""  # the `data.<field>` naming the image


ANNOTATION_RULES = ("latest", "majority")


@dataclass(frozen=True)
class DatasetOptions:
    """The options of one dataset format (at most one of the two is set)."""

    parquet: ParquetOptions | None = None
    label_studio: LabelStudioOptions | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DatasetOptions:
        data = json.loads(text)
        parquet, label_studio = data.get("parquet"), data.get("label_studio")
        return cls(
            parquet=ParquetOptions(**parquet) if parquet is not None else None,
            label_studio=LabelStudioOptions(**label_studio) if label_studio is not None else None,
        )


@dataclass(frozen=True)
class JobSpec:
    """What the caller asked for; immutable once the job exists."""

    dataset_uri: str
    dataset_format: DatasetFormat | None  # None: inferred from the URI
    config: dict[str, Any]  # requested ScoringConfig fields that were set, by engine field name
    initial_weights_uri: str | None = None
    display_name: str = ""
    request_id: str | None = None
    webhook_url: str | None = None  # completion webhook (jobs/webhooks.py)
    owner: str = "default"  # the principal that created the job (o2u_server.principals)
    dataset_options: DatasetOptions | None = None  # None: the format's defaults

    def fingerprint(self) -> str:
        """Digest of the payload, used to tell a retry (same request) from a reused request_id."""
        payload = {
            "dataset_uri": self.dataset_uri,
            "dataset_format": self.dataset_format,
            "config": self.config,
            "initial_weights_uri": self.initial_weights_uri,
            "display_name": self.display_name,
        }
        if self.webhook_url:
            payload["webhook_url"] = self.webhook_url
        if self.dataset_options is not None:
            payload["dataset_options"] = dataclasses.asdict(self.dataset_options)
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class JobError:
    code: int  # google.rpc.Code value
    message: str
    reason: str


@dataclass(frozen=True)
class Progress:
    stage: Stage
    epoch: int = 0
    epochs_total: int = 0
    fraction_done: float = 0.0
    mean_loss: float = 0.0
    learning_rate: float = 0.0
    samples_per_second: float = 0.0
    eta_seconds: float = 0.0
    bytes_read: int = 0  # LOADING: dataset bytes read so far by this attempt
    files_read: int = 0  # LOADING: files or objects read so far by this attempt


@dataclass(frozen=True)
class SkippedRecords:
    """Records of the dataset left out of the job for one reason."""

    reason: str  # UPPER_SNAKE_CASE, e.g. ALL_ANNOTATIONS_CANCELLED
    description: str
    count: int
    first_keys: tuple[str, ...]  # the first few skipped records' keys (Label Studio: task ids)


@dataclass(frozen=True)
class RunInfo:
    seed: int
    engine_version: str
    torch_version: str
    device: str
    num_samples: int
    num_classes: int
    resolved_config_json: str
    server_version: str
    model: str
    dataset_digest: str = ""  # SHA-256 of the data trained on (datasets.content_digest)
    world_size: int = 1  # workers (GPUs, or CPU processes) that trained the job together
    skipped: tuple[SkippedRecords, ...] = ()  # records not scored, one entry per reason


@dataclass(frozen=True)
class WebhookAttempt:
    """One attempt to deliver a job's completion webhook."""

    attempt: int  # 1 for the first
    time: float
    http_status: int  # 0 when the receiver never answered
    outcome: str  # delivered, http_error, timeout, network_error, not_allowed (webhooks.OUTCOMES)
    error: str = ""
    final: bool = False  # delivered, or the last attempt allowed


@dataclass(frozen=True)
class Job:
    job_id: str
    spec: JobSpec
    state: JobState
    create_time: float
    update_time: float
    start_time: float | None = None
    end_time: float | None = None
    progress: Progress | None = None
    error: JobError | None = None
    run_info: RunInfo | None = None
    attempts: int = 0
    last_sequence: int = 0
    webhook_deliveries: tuple[WebhookAttempt, ...] = ()

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_STATES


@dataclass(frozen=True)
class JobEvent:
    job_id: str
    sequence: int  # strictly increasing per job, from 1
    event_time: float
    type: EventType
    state: JobState  # the job's state after this event
    progress: Progress | None = None
    error: JobError | None = None
    message: str = ""

    @property
    def terminal(self) -> bool:
        return self.type is EventType.STATE_CHANGED and self.state in TERMINAL_STATES


@dataclass(frozen=True)
class NoiseScoreRow:
    sample_id: int
    key: str
    given_label: int
    score: float
    score_variance: float
    rank: int
    noise_probability: float
    suspected: bool
    suggested_label: int
    suggested_label_confidence: float
    given_label_name: str = ""
    suggested_label_name: str = ""


@dataclass(frozen=True)
class ScoreFilter:
    top_k: int = 0  # 0: all
    min_score: float | None = None
    only_suspected: bool = False


@dataclass(frozen=True)
class ScorePage:
    scores: list[NoiseScoreRow]
    next_page_token: str
    total_size: int


@dataclass(frozen=True)
class LabelAccuracy:
    """Expected label accuracy with its central interval (o2u_engine.accuracy)."""

    mean: float
    lower: float
    upper: float
    level: float
    method: str
    num_samples: int


@dataclass(frozen=True)
class ClassNoise:
    label: int
    name: str
    count: int
    suspected: int
    noise_rate: float
    label_accuracy: LabelAccuracy | None = None  # None in summaries stored before it existed


@dataclass(frozen=True)
class ConfusedPair:
    given_label: int
    suggested_label: int
    count: int


@dataclass(frozen=True)
class CleanRetrainingInfo:
    ran: bool = False
    accuracy_without_removal: float = 0.0
    accuracy_with_removal: float = 0.0
    removed: int = 0


@dataclass(frozen=True)
class DatasetSummary:
    job_id: str
    num_samples: int
    num_classes: int
    class_names: list[str]
    estimated_noise_rate: float
    noise_rate_used: float
    num_suspected: int
    classes: list[ClassNoise]
    transition_matrix: list[float]  # row-major K x K, row = given label, column = suggested label
    confused_pairs: list[ConfusedPair]
    clean_retraining: CleanRetrainingInfo = field(default_factory=CleanRetrainingInfo)
    run_info: RunInfo | None = None
    noise_rate_capped: bool = False  # the mixture's estimate was unusable; the rate is a fallback
    label_accuracy: LabelAccuracy | None = None  # None in summaries stored before it existed

    @property
    def estimated_label_accuracy(self) -> float:
        return 1.0 - self.estimated_noise_rate
