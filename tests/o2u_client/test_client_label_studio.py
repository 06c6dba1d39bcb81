"""Label Studio review tasks against a real server: a finished job's suspects exported as a JSON
array that validates against the schema of Label Studio's task import (written from its docs),
most suspicious first, each with the given label as an annotation and the suggestion as a
prediction named by the job; image URIs resolved against a folder's or manifest's URI."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import jsonschema

from o2u_client import Client, Job
from o2u_server.datasets.label_studio_export import write_label_studio_tasks
from o2u_server.domain import DatasetFormat, JobSpec
from tests.server_testing import TINY_CONFIG

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
        out = io.StringIO()
        count = write_label_studio_tasks([row], "job-x", spec, out)
        tasks = json.loads(out.getvalue())
        jsonschema.validate(tasks, SCHEMA)
        assert count == 1
        assert tasks[0]["data"]["image"] == "s3://b/batch/cat/01.png"


def test_a_label_studio_export_round_trips_through_a_job(client: Client, data_root: Path) -> None:
    """In: a Label Studio export (task ids, a cancelled annotation, a task without an image) scored by
    a real server; out: its suspects as tasks whose images are the originals and whose keys are the ids."""
    from tests.o2u_server.dataset_files import COLOURS, png, solid
    from tests.o2u_server.datasets.test_label_studio import annotation, task

    folder = data_root / f"ls-{uuid.uuid4().hex[:8]}"
    (folder / "images").mkdir(parents=True)
    names = list(COLOURS)
    tasks = []
    for i in range(30):
        name = names[i % 3]
        (folder / "images" / f"{i:02d}.png").write_bytes(png(solid(COLOURS[name], i % 5)))
        given = names[(i + 1) % 3] if i in (4, 11) else name  # two wrong labels
        anns = [annotation(500 + i, 1000 + i, given, "2026-11-30T10:05:00Z")]
        anns.append(annotation(600 + i, 1000 + i, names[(i + 2) % 3], "2026-11-30T10:09:00Z", cancelled=True))
        tasks.append(task(1000 + i, f"/data/local-files/?d=images/{i:02d}.png", anns))
    tasks.append(task(1999, "", [annotation(700, 1999, "cat", "2026-11-30T10:00:00Z")]))
    export_file = folder / "project-7-at-2026-11-30.json"
    export_file.write_text(json.dumps(tasks))
    job = client.wait(client.submit(export_file.as_uri(), config=TINY_CONFIG).job_id, timeout=300)
    assert job.state == "SUCCEEDED", job.error
    scores = list(client.scores(job.job_id))
    assert sorted(s.key for s in scores) == sorted(str(1000 + i) for i in range(30))
    destination = data_root / "exports" / f"{uuid.uuid4().hex}.json"
    client.export(job.job_id, destination.as_uri(), "label_studio")
    review = json.loads(destination.read_text())
    jsonschema.validate(review, SCHEMA)
    assert len(review) == sum(s.suspected for s in scores)
    originals = {str(t["id"]): t["data"] for t in tasks}
    assert review
    for item in review:
        assert item["data"]["image"] == originals[item["data"]["o2u_key"]]["image"]
        assert item["data"]["image"].startswith("/data/local-files/?d=images/")
