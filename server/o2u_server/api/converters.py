"""Conversions between the o2u.v1 protobuf messages and the server's domain dataclasses.

The servicer is the only caller: requests become domain values here, and domain values become
response messages here, so the job manager, store and runner never touch a protobuf. An enum number
this server does not know is INVALID_ARGUMENT naming the field, never silently "unspecified".
"""

from __future__ import annotations

from typing import Any, TypeVar

from google.protobuf import timestamp_pb2

from o2u.v1 import scoring_pb2 as pb
from o2u_server.domain import (
    DatasetFormat,
    DatasetOptions,
    DatasetSummary,
    EventType,
    ExportFormat,
    Job,
    JobError,
    JobEvent,
    JobSpec,
    JobState,
    LabelAccuracy,
    LabelStudioOptions,
    NoiseScoreRow,
    ParquetOptions,
    Progress,
    RunInfo,
    ScoreFilter,
    SkippedRecords,
    Stage,
    WebhookAttempt,
)
from o2u_server.errors import InvalidArgument

__all__ = [
    "config_message",
    "dataset_format",
    "dataset_options",
    "event_message",
    "export_format",
    "job_message",
    "job_spec",
    "job_state",
    "score_filter",
    "score_message",
    "summary_message",
]

T = TypeVar("T")

_STATES = {state: pb.JobState.Value(f"JOB_STATE_{state.name}") for state in JobState}
_STATES_BACK: dict[pb.JobState.ValueType, JobState] = {value: state for state, value in _STATES.items()}
_STAGES = {stage: pb.Stage.Value(f"STAGE_{stage.name}") for stage in Stage}
_EVENT_TYPES = {kind: pb.JobEventType.Value(f"JOB_EVENT_TYPE_{kind.name}") for kind in EventType}
_DATASET_FORMATS = {kind: pb.DatasetFormat.Value(f"DATASET_FORMAT_{kind.name}") for kind in DatasetFormat}
_DATASET_FORMATS_BACK = {value: kind for kind, value in _DATASET_FORMATS.items()}
_ANNOTATION_RULES = {"latest": pb.ANNOTATION_RULE_LATEST, "majority": pb.ANNOTATION_RULE_MAJORITY}
_ANNOTATION_RULES_BACK = {value: rule for rule, value in _ANNOTATION_RULES.items()}
_EXPORT_FORMATS_BACK = {pb.ExportFormat.Value(f"EXPORT_FORMAT_{kind.name}"): kind for kind in ExportFormat}


def _timestamp(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    if seconds is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(round(seconds * 1e9))
    return stamp


# -- requests -> domain ---------------------------------------------------------------------------


def scoring_config(config: pb.ScoringConfig) -> dict[str, Any]:
    """The fields the caller set, by name (unset fields take the server's default).

    ListFields reports exactly the fields with presence: `optional` ones that were set, even to
    zero, and `model` when not empty. The weights URI is not a hyperparameter and travels apart.
    """
    return {field.name: value for field, value in config.ListFields() if field.name != "initial_weights_uri"}


def _known(value: int, known: dict[Any, T], enum_name: str, field: str) -> T | None:
    """The domain value of a proto enum number; None for 0 (UNSPECIFIED); InvalidArgument naming
    `field` for a number this server does not know (proto3 enums are open: a newer client, or a
    forged request, can send any number)."""
    if value == 0:
        return None
    if value not in known:
        names = ", ".join(str(number) for number in sorted(known))
        raise InvalidArgument(
            f"{field} {value} is not a {enum_name} this server knows (0 or one of {names})",
            reason="UNKNOWN_ENUM_VALUE",
            field=field,
        )
    return known[value]


def dataset_format(value: pb.DatasetFormat.ValueType) -> DatasetFormat | None:
    """The dataset format; None (UNSPECIFIED) means inferred from the URI."""
    return _known(value, _DATASET_FORMATS_BACK, "DatasetFormat", "dataset.format")


def dataset_options(dataset: pb.DatasetRef) -> DatasetOptions | None:
    """The options as given; None when the request has none (the format's defaults)."""
    if not dataset.HasField("options"):
        return None
    options = dataset.options
    kind = options.WhichOneof("format_options")
    if kind == "parquet":
        p = options.parquet
        return DatasetOptions(
            parquet=ParquetOptions(p.label_column, p.key_column, p.embedding_column, p.image_key_column)
        )
    if kind == "label_studio":
        rule = _known(
            options.label_studio.annotation_rule,
            _ANNOTATION_RULES_BACK,
            "AnnotationRule",
            "dataset.options.label_studio.annotation_rule",
        )
        return DatasetOptions(label_studio=LabelStudioOptions(rule or "", options.label_studio.image_field))
    return None  # an empty DatasetOptions: no format's options


def _dataset_options_message(options: DatasetOptions | None) -> pb.DatasetOptions | None:
    if options is None:
        return None
    if options.parquet is not None:
        p = options.parquet
        return pb.DatasetOptions(
            parquet=pb.ParquetOptions(
                label_column=p.label_column,
                key_column=p.key_column,
                embedding_column=p.embedding_column,
                image_key_column=p.image_key_column,
            )
        )
    if options.label_studio is not None:
        rule = options.label_studio.annotation_rule
        return pb.DatasetOptions(
            label_studio=pb.LabelStudioOptions(
                annotation_rule=_ANNOTATION_RULES.get(rule, pb.ANNOTATION_RULE_UNSPECIFIED),
                image_field=options.label_studio.image_field,
            )
        )
    return None


def job_spec(request: pb.CreateScoringJobRequest) -> JobSpec:
    return JobSpec(
        dataset_uri=request.dataset.uri,
        dataset_format=dataset_format(request.dataset.format),
        config=scoring_config(request.config),
        initial_weights_uri=request.config.initial_weights_uri or None,
        display_name=request.display_name,
        request_id=request.request_id or None,
        webhook_url=request.webhook.url if request.HasField("webhook") else None,
        dataset_options=dataset_options(request.dataset),
    )


def job_state(value: pb.JobState.ValueType) -> JobState | None:
    """A state filter; UNSPECIFIED means no filter."""
    return _known(value, _STATES_BACK, "JobState", "state")


def export_format(value: pb.ExportFormat.ValueType) -> ExportFormat | None:
    """The export format; None (UNSPECIFIED) means inferred from the destination."""
    return _known(value, _EXPORT_FORMATS_BACK, "ExportFormat", "format")


def score_filter(request: pb.ListNoiseScoresRequest) -> ScoreFilter:
    return ScoreFilter(
        top_k=request.top_k,
        min_score=request.min_score if request.HasField("min_score") else None,
        only_suspected=request.only_suspected,
    )


# -- domain -> responses --------------------------------------------------------------------------


def config_message(config: dict[str, Any], initial_weights_uri: str | None) -> pb.ScoringConfig:
    return pb.ScoringConfig(**config, initial_weights_uri=initial_weights_uri or "")


def _progress(progress: Progress | None) -> pb.JobProgress | None:
    if progress is None:
        return None
    return pb.JobProgress(
        stage=_STAGES[progress.stage],
        epoch=progress.epoch,
        epochs_total=progress.epochs_total,
        fraction_done=progress.fraction_done,
        mean_loss=progress.mean_loss,
        learning_rate=progress.learning_rate,
        samples_per_second=progress.samples_per_second,
        eta_seconds=progress.eta_seconds,
        bytes_read=progress.bytes_read,
        files_read=progress.files_read,
    )


def _error(error: JobError | None) -> pb.JobError | None:
    return None if error is None else pb.JobError(code=error.code, message=error.message, reason=error.reason)


def _run_info(info: RunInfo | None) -> pb.RunInfo | None:
    if info is None:
        return None
    return pb.RunInfo(
        seed=info.seed,
        engine_version=info.engine_version,
        torch_version=info.torch_version,
        device=info.device,
        num_samples=info.num_samples,
        num_classes=info.num_classes,
        resolved_config_json=info.resolved_config_json,
        server_version=info.server_version,
        model=info.model,
        dataset_digest=info.dataset_digest,
        world_size=info.world_size,
        skipped=[_skipped(item) for item in info.skipped],
    )


def _skipped(item: SkippedRecords) -> pb.SkippedRecords:
    return pb.SkippedRecords(
        reason=item.reason, description=item.description, count=item.count, first_keys=item.first_keys
    )


def job_message(job: Job) -> pb.ScoringJob:
    spec = job.spec
    return pb.ScoringJob(
        job_id=job.job_id,
        request_id=spec.request_id or "",
        display_name=spec.display_name,
        dataset=pb.DatasetRef(
            uri=spec.dataset_uri,
            format=(
                _DATASET_FORMATS[spec.dataset_format]
                if spec.dataset_format
                else pb.DATASET_FORMAT_UNSPECIFIED
            ),
            options=_dataset_options_message(spec.dataset_options),
        ),
        config=config_message(spec.config, spec.initial_weights_uri),
        state=_STATES[job.state],
        progress=_progress(job.progress),
        create_time=_timestamp(job.create_time),
        start_time=_timestamp(job.start_time),
        end_time=_timestamp(job.end_time),
        update_time=_timestamp(job.update_time),
        error=_error(job.error),
        run_info=_run_info(job.run_info),
        attempts=job.attempts,
        owner=job.spec.owner,
        webhook_url=spec.webhook_url or "",
        webhook_deliveries=[_webhook_delivery(attempt) for attempt in job.webhook_deliveries],
    )


_WEBHOOK_OUTCOMES = {
    "delivered": pb.WEBHOOK_OUTCOME_DELIVERED,
    "http_error": pb.WEBHOOK_OUTCOME_HTTP_ERROR,
    "timeout": pb.WEBHOOK_OUTCOME_TIMEOUT,
    "network_error": pb.WEBHOOK_OUTCOME_NETWORK_ERROR,
    "not_allowed": pb.WEBHOOK_OUTCOME_NOT_ALLOWED,
}


def _webhook_delivery(attempt: WebhookAttempt) -> pb.WebhookDelivery:
    return pb.WebhookDelivery(
        attempt=attempt.attempt,
        time=_timestamp(attempt.time),
        http_status=attempt.http_status,
        outcome=_WEBHOOK_OUTCOMES.get(attempt.outcome, pb.WEBHOOK_OUTCOME_UNSPECIFIED),
        error=attempt.error,
        final=attempt.final,
    )


def event_message(event: JobEvent) -> pb.JobEvent:
    return pb.JobEvent(
        sequence=event.sequence,
        event_time=_timestamp(event.event_time),
        type=_EVENT_TYPES[event.type],
        state=_STATES[event.state],
        progress=_progress(event.progress),
        error=_error(event.error),
        message=event.message,
    )


def score_message(row: NoiseScoreRow) -> pb.NoiseScore:
    return pb.NoiseScore(
        sample_id=row.sample_id,
        key=row.key,
        given_label=row.given_label,
        given_label_name=row.given_label_name,
        score=row.score,
        score_variance=row.score_variance,
        rank=row.rank,
        noise_probability=row.noise_probability,
        suspected=row.suspected,
        suggested_label=row.suggested_label,
        suggested_label_name=row.suggested_label_name,
        suggested_label_confidence=row.suggested_label_confidence,
    )


def summary_message(summary: DatasetSummary) -> pb.DatasetSummary:
    retraining = summary.clean_retraining
    return pb.DatasetSummary(
        job_id=summary.job_id,
        num_samples=summary.num_samples,
        num_classes=summary.num_classes,
        class_names=summary.class_names,
        estimated_noise_rate=summary.estimated_noise_rate,
        noise_rate_used=summary.noise_rate_used,
        num_suspected=summary.num_suspected,
        estimated_label_accuracy=summary.estimated_label_accuracy,
        classes=[
            pb.ClassNoise(
                label=c.label,
                name=c.name,
                count=c.count,
                suspected=c.suspected,
                noise_rate=c.noise_rate,
                label_accuracy=_label_accuracy(c.label_accuracy),
            )
            for c in summary.classes
        ],
        transition_matrix=summary.transition_matrix,
        confused_pairs=[
            pb.ConfusedPair(given_label=p.given_label, suggested_label=p.suggested_label, count=p.count)
            for p in summary.confused_pairs
        ],
        clean_retraining=pb.CleanRetraining(
            ran=retraining.ran,
            accuracy_without_removal=retraining.accuracy_without_removal,
            accuracy_with_removal=retraining.accuracy_with_removal,
            removed=retraining.removed,
        ),
        run_info=_run_info(summary.run_info),
        noise_rate_capped=summary.noise_rate_capped,
        label_accuracy=_label_accuracy(summary.label_accuracy),
    )


def _label_accuracy(value: LabelAccuracy | None) -> pb.LabelAccuracyEstimate | None:
    if value is None:
        return None
    return pb.LabelAccuracyEstimate(
        mean=value.mean,
        lower=value.lower,
        upper=value.upper,
        level=value.level,
        method=value.method,
        num_samples=value.num_samples,
    )
