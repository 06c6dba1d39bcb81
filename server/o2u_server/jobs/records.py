"""Job store rows to and from domain dataclasses, and the JSON kept in their TEXT columns.

Progress, errors, run information and dataset summaries are small, read whole and never queried by
field, so a JSON column keeps the schema short; scores, which are paged and filtered, get real
columns (see `results`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from o2u_server.domain import (
    ClassNoise,
    CleanRetrainingInfo,
    ConfusedPair,
    DatasetFormat,
    DatasetOptions,
    DatasetSummary,
    EventType,
    Job,
    JobError,
    JobEvent,
    JobSpec,
    JobState,
    LabelAccuracy,
    Progress,
    RunInfo,
    SkippedRecords,
    Stage,
)

__all__ = [
    "decode_error",
    "decode_progress",
    "decode_run_info",
    "decode_summary",
    "encode",
    "event_from_row",
    "job_from_row",
    "new_job_row",
]


def encode(value: Any) -> str | None:
    """JSON text of a dataclass (None stays None, for nullable columns)."""
    if value is None:
        return None
    return json.dumps(dataclasses.asdict(value), sort_keys=True)


def decode_progress(text: str | None) -> Progress | None:
    if text is None:
        return None
    data = json.loads(text)
    data["stage"] = Stage(data["stage"])
    return Progress(**data)


def decode_error(text: str | None) -> JobError | None:
    return None if text is None else JobError(**json.loads(text))


def _run_info(data: dict[str, Any] | None) -> RunInfo | None:
    if data is None:
        return None
    skipped = tuple(
        SkippedRecords(**{**item, "first_keys": tuple(item["first_keys"])})
        for item in data.pop("skipped", ())
    )
    return RunInfo(**data, skipped=skipped)


def decode_run_info(text: str | None) -> RunInfo | None:
    return None if text is None else _run_info(json.loads(text))


def _with_accuracy(data: dict[str, Any]) -> dict[str, Any]:
    if data.get("label_accuracy") is not None:
        data["label_accuracy"] = LabelAccuracy(**data["label_accuracy"])
    return data


def decode_summary(text: str) -> DatasetSummary:
    data = json.loads(text)
    data["classes"] = [ClassNoise(**_with_accuracy(item)) for item in data["classes"]]
    _with_accuracy(data)
    data["confused_pairs"] = [ConfusedPair(**item) for item in data["confused_pairs"]]
    data["clean_retraining"] = CleanRetrainingInfo(**data["clean_retraining"])
    data["run_info"] = _run_info(data["run_info"])
    return DatasetSummary(**data)


def new_job_row(job_id: str, spec: JobSpec, now: float) -> dict[str, object]:
    """The columns of a newly accepted (QUEUED) job's row; the rest keep their defaults."""
    return {
        "job_id": job_id,
        "request_id": spec.request_id or None,
        "owner": spec.owner,
        "request_hash": spec.fingerprint(),
        "display_name": spec.display_name,
        "dataset_uri": spec.dataset_uri,
        "dataset_format": spec.dataset_format.value if spec.dataset_format else None,
        "config_json": json.dumps(spec.config, sort_keys=True),
        "initial_weights_uri": spec.initial_weights_uri,
        "webhook_url": spec.webhook_url,
        "dataset_options_json": spec.dataset_options.to_json() if spec.dataset_options else None,
        "state": JobState.QUEUED.value,
        "create_time": now,
        "update_time": now,
    }


def job_from_row(row: Mapping[Any, Any]) -> Job:
    spec = JobSpec(
        dataset_uri=row["dataset_uri"],
        dataset_format=DatasetFormat(row["dataset_format"]) if row["dataset_format"] else None,
        config=json.loads(row["config_json"]),
        initial_weights_uri=row["initial_weights_uri"],
        display_name=row["display_name"],
        request_id=row["request_id"],
        webhook_url=row["webhook_url"],
        owner=row["owner"],
        dataset_options=(
            DatasetOptions.from_json(row["dataset_options_json"]) if row["dataset_options_json"] else None
        ),
    )
    return Job(
        job_id=row["job_id"],
        spec=spec,
        state=JobState(row["state"]),
        create_time=row["create_time"],
        update_time=row["update_time"],
        start_time=row["start_time"],
        end_time=row["end_time"],
        progress=decode_progress(row["progress_json"]),
        error=decode_error(row["error_json"]),
        run_info=decode_run_info(row["run_info_json"]),
        attempts=row["attempts"],
        last_sequence=row["last_sequence"],
    )


def event_from_row(row: Mapping[Any, Any]) -> JobEvent:
    return JobEvent(
        job_id=row["job_id"],
        sequence=row["sequence"],
        event_time=row["event_time"],
        type=EventType(row["type"]),
        state=JobState(row["state"]),
        progress=decode_progress(row["progress_json"]),
        error=decode_error(row["error_json"]),
        message=row["message"],
    )
