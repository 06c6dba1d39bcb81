"""Conversions from protobuf to the client's dataclasses, config building and event lines: the
pure parts of the client, checked without a server. An enum number from a newer server, in any
enum the client converts, reads as unspecified."""

from __future__ import annotations

import io
import json

import pytest
from google.protobuf import timestamp_pb2
from rich.console import Console

from o2u.v1 import scoring_pb2
from o2u_client import DatasetSummary, Event, EventType, Job, JobState, Stage, build_config
from o2u_client.models import to_json_dict
from o2u_client.progress import describe_event, format_duration, progress_display
from o2u_client.render import job_details


def test_job_conversion_keeps_set_config_fields_and_times() -> None:
    proto = scoring_pb2.ScoringJob(
        job_id="job-1",
        state=scoring_pb2.JOB_STATE_FAILED,
        dataset=scoring_pb2.DatasetRef(uri="s3://b/k.npz", format=scoring_pb2.DATASET_FORMAT_NPZ),
        config=scoring_pb2.ScoringConfig(model="mlp", seed=0, noise_rate=0.0),
        create_time=timestamp_pb2.Timestamp(seconds=1_700_000_000),
        error=scoring_pb2.JobError(code=8, message="out of memory", reason="DEVICE_OUT_OF_MEMORY"),
    )
    job = Job.from_proto(proto)
    assert job.state is JobState.FAILED
    assert job.done
    assert job.dataset_format == "NPZ"
    # Explicitly set zeros are kept: "seed 0" differs from "no seed".
    assert job.config == {"model": "mlp", "seed": 0, "noise_rate": 0.0}
    assert job.create_time is not None
    assert job.create_time.isoformat() == "2023-11-14T22:13:20+00:00"
    assert job.start_time is None
    assert job.progress is None
    assert job.error is not None
    assert (job.error.code, job.error.reason) == ("RESOURCE_EXHAUSTED", "DEVICE_OUT_OF_MEMORY")
    document = to_json_dict(job)
    assert "raw" not in document
    assert document["state"] == "FAILED"
    assert json.loads(json.dumps(document))["create_time"] == "2023-11-14T22:13:20+00:00"


def test_unknown_enum_numbers_from_a_newer_server_do_not_fail() -> None:
    event = Event.from_proto(scoring_pb2.JobEvent(sequence=4, type=99, state=42))  # type: ignore[arg-type]
    assert event.type is EventType.UNSPECIFIED
    assert event.state is JobState.UNSPECIFIED


NEWER = 97  # an enum number no version of the protocol this client knows defines


def _newer_job(**fields: object) -> Job:
    job = Job.from_proto(scoring_pb2.ScoringJob(job_id="job-1", **fields))  # type: ignore[arg-type]
    to_json_dict(job)
    job_details(job)  # what `o2u get` prints
    return job


def test_unknown_job_state_and_stage() -> None:
    progress = scoring_pb2.JobProgress(stage=NEWER)  # type: ignore[arg-type]
    job = _newer_job(state=NEWER, progress=progress)
    assert job.state is JobState.UNSPECIFIED
    assert job.progress is not None
    assert job.progress.stage is Stage.UNSPECIFIED


def test_unknown_dataset_format() -> None:
    job = _newer_job(dataset=scoring_pb2.DatasetRef(uri="s3://b/k.arrow", format=NEWER))  # type: ignore[arg-type]
    assert job.dataset_format == "UNSPECIFIED"
    assert job.dataset_uri == "s3://b/k.arrow"


def test_unknown_webhook_outcome() -> None:
    delivery = scoring_pb2.WebhookDelivery(attempt=1, outcome=NEWER, final=True)  # type: ignore[arg-type]
    job = _newer_job(webhook_deliveries=[delivery])
    assert [(d.attempt, d.outcome, d.final) for d in job.webhook_deliveries] == [(1, "UNSPECIFIED", True)]


def test_unknown_annotation_rule() -> None:
    rule = scoring_pb2.LabelStudioOptions(annotation_rule=NEWER, image_field="img")  # type: ignore[arg-type]
    dataset = scoring_pb2.DatasetRef(
        uri="s3://b/tasks.json", options=scoring_pb2.DatasetOptions(label_studio=rule)
    )
    job = _newer_job(dataset=dataset)
    assert job.dataset_options == {"annotation_rule": "unspecified", "image_field": "img"}


def test_summary_transition_matrix_is_a_list_of_rows() -> None:
    proto = scoring_pb2.DatasetSummary(
        job_id="job-1",
        num_samples=10,
        num_classes=2,
        class_names=["cat", "dog"],
        transition_matrix=[0.9, 0.1, 0.25, 0.75],
        confused_pairs=[scoring_pb2.ConfusedPair(given_label=1, suggested_label=0, count=2)],
    )
    summary = DatasetSummary.from_proto(proto)
    assert summary.transition_matrix == [[0.9, 0.1], [0.25, 0.75]]
    assert summary.confused_pairs[0].count == 2
    assert summary.clean_retraining is None
    assert summary.run_info is None


def test_build_config() -> None:
    config = build_config({"model": "cnn9", "seed": 1}, seed=2, noise_rate=None, augment=False)
    assert config.model == "cnn9"
    assert config.seed == 2
    assert not config.HasField("noise_rate")
    assert config.HasField("augment")
    assert not config.augment
    base = scoring_pb2.ScoringConfig(num_cycles=3)
    assert build_config(base, seed=5) == scoring_pb2.ScoringConfig(num_cycles=3, seed=5)
    with pytest.raises(TypeError, match="unknown ScoringConfig field 'epochs'"):
        build_config(epochs=3)


def test_event_lines() -> None:
    progress = scoring_pb2.JobProgress(
        stage=scoring_pb2.STAGE_CYCLIC,
        epoch=3,
        epochs_total=10,
        fraction_done=0.45,
        mean_loss=1.23456,
        learning_rate=0.0055,
        samples_per_second=12345.6,
        eta_seconds=72.4,
    )
    event = Event.from_proto(
        scoring_pb2.JobEvent(sequence=7, type=scoring_pb2.JOB_EVENT_TYPE_PROGRESS, progress=progress)
    )
    assert event.progress is not None
    assert event.progress.stage is Stage.CYCLIC
    assert describe_event(event) == (
        "[ 45%] cyclic           epoch 3/10  loss 1.2346  lr 0.00550  12,346 samples/s  ETA 0:01:12"
    )
    failed = Event.from_proto(
        scoring_pb2.JobEvent(
            sequence=8,
            type=scoring_pb2.JOB_EVENT_TYPE_STATE_CHANGED,
            state=scoring_pb2.JOB_STATE_FAILED,
            error=scoring_pb2.JobError(code=3, message="labels must be in [0, 10)", reason="INVALID_DATASET"),
        )
    )
    assert (
        describe_event(failed) == "state FAILED (INVALID_ARGUMENT INVALID_DATASET: labels must be in [0, 10))"
    )
    ranking = scoring_pb2.JobProgress(stage=scoring_pb2.STAGE_RANKING, fraction_done=1.0)
    ranking_event = Event.from_proto(
        scoring_pb2.JobEvent(type=scoring_pb2.JOB_EVENT_TYPE_PROGRESS, progress=ranking)
    )
    assert describe_event(ranking_event) == "[100%] ranking"
    assert format_duration(-1.0) == "-"
    assert format_duration(float("nan")) == "-"
    assert format_duration(3725.2) == "1:02:05"


def test_live_bar_on_a_terminal() -> None:
    output = io.StringIO()
    console = Console(file=output, force_terminal=True, width=140)
    progress = scoring_pb2.JobProgress(
        stage=scoring_pb2.STAGE_PRETRAINING, epoch=2, epochs_total=4, fraction_done=0.25, eta_seconds=30
    )
    events = [
        scoring_pb2.JobEvent(
            sequence=1, type=scoring_pb2.JOB_EVENT_TYPE_STATE_CHANGED, state=scoring_pb2.JOB_STATE_RUNNING
        ),
        scoring_pb2.JobEvent(sequence=2, type=scoring_pb2.JOB_EVENT_TYPE_PROGRESS, progress=progress),
        scoring_pb2.JobEvent(
            sequence=3, type=scoring_pb2.JOB_EVENT_TYPE_STATE_CHANGED, state=scoring_pb2.JOB_STATE_SUCCEEDED
        ),
    ]
    with progress_display(console) as show:
        for event in events:
            show(Event.from_proto(event))
    text = output.getvalue()
    assert "\x1b[" in text, "a terminal gets a live, redrawn bar"
    assert "epoch 2/4" in text  # the last epoch's figures stay on the finished bar
    assert "state SUCCEEDED" in text
    assert "100%" in text
