"""Label Studio review tasks against a real server: a finished job's suspects exported as a JSON
array that validates against the schema of Label Studio's task import (written from its docs),
most suspicious first, each with the given label as an annotation and the suggestion as a
prediction named by the job; image URIs resolved against a folder's or manifest's URI."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import jsonschema

from o2u_client import Client, Job
from o2u_server.datasets.label_studio_export import label_studio_tasks
from o2u_server.domain import DatasetFormat, JobSpec

SCHEMA = json.loads(
    (
        Path(__file__).parents[1] / "o2u_server" / "datasets" / "label_studio_task_import.schema.json"
    ).read_text()
)


def test_suspects_export_as_label_studio_tasks(client: Client, finished_job: Job, data_root: Path) -> None:
    destination = data_root / "exports" / f"{uuid.uuid4().hex}.json"
    result = client.export(finished_job.job_id, destination.as_uri())
    tasks = json.loads(destination.read_text())
    jsonschema.validate(tasks, SCHEMA)
    suspects = [s for s in client.scores(finished_job.job_id) if s.suspected]
    assert result.rows_written == len(tasks) == len(suspects) > 0
    assert [t["data"]["o2u_rank"] for t in tasks] == sorted(s.rank for s in suspects)
    first, top = tasks[0], min(suspects, key=lambda s: s.rank)
    assert first["data"]["o2u_key"] == top.key
    assert first["data"]["o2u_noise_score"] == top.score
    assert "image" not in first["data"], "an .npz holds no files to show"
    assert first["annotations"][0]["result"][0]["value"]["choices"] == [top.given_label_name]
    prediction = first["predictions"][0]
    assert prediction["model_version"] == finished_job.job_id
    assert prediction["score"] == top.suggested_label_confidence
    assert prediction["result"][0]["value"]["choices"] == [top.suggested_label_name]
    assert prediction["result"][0]["from_name"] == "label"
    assert prediction["result"][0]["to_name"] == "image"


def test_image_uris_resolve_against_the_dataset() -> None:
    row: dict[str, object] = {
        "key": "cat/01.png",
        "sample_id": 3,
        "rank": 1,
        "score": 2.5,
        "noise_probability": 0.9,
        "suspected": True,
        "given_label_name": "cat",
        "suggested_label_name": "dog",
        "suggested_label_confidence": 0.75,
    }
    folder = JobSpec("s3://b/batch/", DatasetFormat.IMAGE_FOLDER, {})
    manifest = JobSpec("s3://b/batch/manifest.csv", None, {})
    for spec in (folder, manifest):
        count, data = label_studio_tasks([row, {**row, "rank": 2, "suspected": False}], "job-x", spec)
        tasks = json.loads(data)
        jsonschema.validate(tasks, SCHEMA)
        assert count == 1
        assert tasks[0]["data"]["image"] == "s3://b/batch/cat/01.png"
