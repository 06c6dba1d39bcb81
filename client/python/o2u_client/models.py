"""Plain, frozen types for jobs and their events, converted from the protocol's messages.

Callers work with these dataclasses (string enums, `datetime`s, dicts) instead of protobufs; the
message each one came from stays reachable as `.raw` for fields added to the protocol later.
`to_json_dict` turns any result type of the client into JSON-ready data for the CLI's `--json`.
Scores and summaries live in `o2u_client.results`.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf import message as _message
from google.protobuf import timestamp_pb2

from o2u.v1 import scoring_pb2

__all__ = [
    "Event",
    "EventType",
    "Job",
    "JobError",
    "JobState",
    "Progress",
    "RunInfo",
    "Stage",
    "WebhookDelivery",
    "to_json_dict",
]


class JobState(enum.StrEnum):
    """Lifecycle of a job: QUEUED -> RUNNING -> SUCCEEDED | FAILED | CANCELLED."""

    UNSPECIFIED = "UNSPECIFIED"
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def is_terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class Stage(enum.StrEnum):
    """Part of the O2U-Net pipeline a job is in."""

    UNSPECIFIED = "UNSPECIFIED"
    LOADING = "LOADING"
    PRETRAINING = "PRETRAINING"
    CYCLIC = "CYCLIC"
    CLEAN_RETRAINING = "CLEAN_RETRAINING"
    RANKING = "RANKING"


class EventType(enum.StrEnum):
    UNSPECIFIED = "UNSPECIFIED"
    STATE_CHANGED = "STATE_CHANGED"
    PROGRESS = "PROGRESS"


def _enum_name(proto_enum: Any, prefix: str, value: int) -> str:
    """The value's name without `prefix`, e.g. `NPZ`; an unknown number (a newer server) is
    `UNSPECIFIED` instead of failing the call."""
    try:
        name: str = proto_enum.Name(value)
    except ValueError:
        return "UNSPECIFIED"
    return name.removeprefix(prefix)


def _enum_from(kind: type[enum.StrEnum], proto_enum: Any, prefix: str, value: int) -> Any:
    # Unknown numbers, or names this client has no member for, fall back to UNSPECIFIED.
    try:
        return kind(_enum_name(proto_enum, prefix, value))
    except ValueError:
        return kind("UNSPECIFIED")


# google.rpc.Code numbers (as in JobError.code) to their canonical names.
_CODE_NAMES = {status.value[0]: status.name for status in grpc.StatusCode}


def _time(message: _message.Message, name: str) -> datetime | None:
    if not message.HasField(name):
        return None
    stamp: timestamp_pb2.Timestamp = getattr(message, name)
    return stamp.ToDatetime(tzinfo=UTC)


@dataclass(frozen=True)
class Progress:
    """Figures of the last finished epoch."""

    stage: Stage
    epoch: int  # 1-based within the stage
    epochs_total: int
    fraction_done: float  # of the whole job's training, 0..1
    mean_loss: float
    learning_rate: float
    samples_per_second: float
    eta_seconds: float
    bytes_read: int = 0  # LOADING: dataset bytes read so far
    files_read: int = 0  # LOADING: files or objects read so far

    @classmethod
    def from_proto(cls, proto: scoring_pb2.JobProgress) -> Progress:
        return cls(
            stage=_enum_from(Stage, scoring_pb2.Stage, "STAGE_", proto.stage),
            epoch=proto.epoch,
            epochs_total=proto.epochs_total,
            fraction_done=proto.fraction_done,
            mean_loss=proto.mean_loss,
            learning_rate=proto.learning_rate,
            samples_per_second=proto.samples_per_second,
            eta_seconds=proto.eta_seconds,
            bytes_read=proto.bytes_read,
            files_read=proto.files_read,
        )


@dataclass(frozen=True)
class JobError:
    """Why a job failed: canonical code name, an actionable message and a reason."""

    code: str
    message: str
    reason: str

    @classmethod
    def from_proto(cls, proto: scoring_pb2.JobError) -> JobError:
        return cls(
            code=_CODE_NAMES.get(proto.code, str(proto.code)), message=proto.message, reason=proto.reason
        )


@dataclass(frozen=True)
class SkippedRecords:
    """Records of the dataset left out of the job for one reason (SkippedRecords)."""

    reason: str  # e.g. ALL_ANNOTATIONS_CANCELLED
    description: str
    count: int
    first_keys: tuple[str, ...]  # the first few (Label Studio: task ids)

    @classmethod
    def from_proto(cls, proto: scoring_pb2.SkippedRecords) -> SkippedRecords:
        return cls(proto.reason, proto.description, proto.count, tuple(proto.first_keys))


@dataclass(frozen=True)
class RunInfo:
    """What produced a job's results, for reproducibility."""

    seed: int
    engine_version: str
    torch_version: str
    device: str
    num_samples: int
    num_classes: int
    model: str
    server_version: str
    resolved_config: Mapping[str, Any]
    dataset_digest: str = ""  # SHA-256 of the samples, labels, keys and class names trained on
    world_size: int = 1  # data-parallel workers that trained the job together
    skipped: tuple[SkippedRecords, ...] = ()  # the dataset's records left out, one per reason

    @classmethod
    def from_proto(cls, proto: scoring_pb2.RunInfo) -> RunInfo:
        resolved = json.loads(proto.resolved_config_json) if proto.resolved_config_json else {}
        return cls(
            seed=proto.seed,
            engine_version=proto.engine_version,
            torch_version=proto.torch_version,
            device=proto.device,
            num_samples=proto.num_samples,
            num_classes=proto.num_classes,
            model=proto.model,
            server_version=proto.server_version,
            resolved_config=resolved,
            dataset_digest=proto.dataset_digest,
            world_size=proto.world_size or 1,
            skipped=tuple(SkippedRecords.from_proto(item) for item in proto.skipped),
        )


def dataset_options_to_dict(options: scoring_pb2.DatasetOptions) -> dict[str, str]:
    """The options that were set, by field name (`annotation_rule` as `latest` or `majority`, or
    `unspecified` for a rule this client does not know)."""
    kind = options.WhichOneof("format_options")
    if kind is None:
        return {}
    values: dict[str, str] = {}
    for descriptor, value in getattr(options, kind).ListFields():
        if descriptor.name == "annotation_rule":
            value = _enum_name(scoring_pb2.AnnotationRule, "ANNOTATION_RULE_", value).lower()
        values[descriptor.name] = str(value)
    return values


def config_to_dict(config: scoring_pb2.ScoringConfig) -> dict[str, Any]:
    """The fields of a ScoringConfig that were set, by name."""
    return {descriptor.name: value for descriptor, value in config.ListFields()}


@dataclass(frozen=True)
class WebhookDelivery:
    """One attempt to deliver a job's completion webhook (WebhookDelivery)."""

    attempt: int
    time: datetime | None
    http_status: int  # 0 when the receiver never answered
    outcome: str  # DELIVERED, HTTP_ERROR, TIMEOUT, NETWORK_ERROR, NOT_ALLOWED (UNSPECIFIED: unknown)
    error: str
    final: bool

    @classmethod
    def from_proto(cls, proto: scoring_pb2.WebhookDelivery) -> WebhookDelivery:
        return cls(
            attempt=proto.attempt,
            time=_time(proto, "time"),
            http_status=proto.http_status,
            outcome=_enum_name(scoring_pb2.WebhookOutcome, "WEBHOOK_OUTCOME_", proto.outcome),
            error=proto.error,
            final=proto.final,
        )


@dataclass(frozen=True)
class Job:
    """One scoring job (ScoringJob)."""

    job_id: str
    state: JobState
    display_name: str
    request_id: str
    dataset_uri: str
    dataset_format: str
    config: Mapping[str, Any]  # the configuration as requested (set fields only)
    progress: Progress | None
    error: JobError | None
    run_info: RunInfo | None
    attempts: int
    create_time: datetime | None
    start_time: datetime | None
    end_time: datetime | None
    update_time: datetime | None
    raw: scoring_pb2.ScoringJob = field(repr=False, compare=False)
    webhook_url: str = ""
    webhook_deliveries: tuple[WebhookDelivery, ...] = ()
    owner: str = ""  # the principal that created the job
    dataset_options: Mapping[str, str] = field(default_factory=dict)  # as given, e.g. label_column

    @property
    def done(self) -> bool:
        """Whether the job reached a final state."""
        return self.state.is_terminal

    @classmethod
    def from_proto(cls, proto: scoring_pb2.ScoringJob) -> Job:
        return cls(
            job_id=proto.job_id,
            state=_enum_from(JobState, scoring_pb2.JobState, "JOB_STATE_", proto.state),
            display_name=proto.display_name,
            request_id=proto.request_id,
            dataset_uri=proto.dataset.uri,
            dataset_format=_enum_name(scoring_pb2.DatasetFormat, "DATASET_FORMAT_", proto.dataset.format),
            config=config_to_dict(proto.config),
            progress=Progress.from_proto(proto.progress) if proto.HasField("progress") else None,
            error=JobError.from_proto(proto.error) if proto.HasField("error") else None,
            run_info=RunInfo.from_proto(proto.run_info) if proto.HasField("run_info") else None,
            attempts=proto.attempts,
            create_time=_time(proto, "create_time"),
            start_time=_time(proto, "start_time"),
            end_time=_time(proto, "end_time"),
            update_time=_time(proto, "update_time"),
            owner=proto.owner,
            dataset_options=dataset_options_to_dict(proto.dataset.options),
            raw=proto,
            webhook_url=proto.webhook_url,
            webhook_deliveries=tuple(WebhookDelivery.from_proto(d) for d in proto.webhook_deliveries),
        )


@dataclass(frozen=True)
class Event:
    """One entry of a job's ordered event log (JobEvent)."""

    sequence: int
    type: EventType
    state: JobState  # the job's state after this event
    event_time: datetime | None
    progress: Progress | None
    error: JobError | None
    message: str
    raw: scoring_pb2.JobEvent = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, proto: scoring_pb2.JobEvent) -> Event:
        return cls(
            sequence=proto.sequence,
            type=_enum_from(EventType, scoring_pb2.JobEventType, "JOB_EVENT_TYPE_", proto.type),
            state=_enum_from(JobState, scoring_pb2.JobState, "JOB_STATE_", proto.state),
            event_time=_time(proto, "event_time"),
            progress=Progress.from_proto(proto.progress) if proto.HasField("progress") else None,
            error=JobError.from_proto(proto.error) if proto.HasField("error") else None,
            message=proto.message,
            raw=proto,
        )


def to_json_dict(value: Any) -> Any:
    """JSON-ready data for a result dataclass (or list/dict of them), without the raw protobufs."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: to_json_dict(getattr(value, f.name)) for f in dataclasses.fields(value) if f.name != "raw"
        }
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): to_json_dict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json_dict(v) for v in value]
    return value
