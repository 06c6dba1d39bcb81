"""Dataset options end to end against a real server: a Parquet file with other column names, a
Parquet file of image keys, a Label Studio export whose tasks have several annotations read under
`latest` and `majority`, the skipped tasks reported by GetScoringJob, the options echoed back with
the job, and options that cannot apply refused with INVALID_ARGUMENT naming the option."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from o2u_client import Client, InvalidArgumentError, Job
from o2u_client.cli import main
from tests.o2u_client.test_client_cli import TINY_FLAGS
from tests.o2u_server.dataset_files import COLOURS, png, solid
from tests.o2u_server.datasets.test_label_studio import annotation, task
from tests.server_testing import TINY_CONFIG, RunningServer

NAMES = list(COLOURS)


def renamed_digits(data_root: Path) -> tuple[Path, list[str]]:
    """The digits as a Parquet file whose columns are `id`, `y` and `emb`, in row groups of 64."""
    with np.load(data_root / "digits.npz") as archive:
        x, y = archive["x"].astype(np.float32), archive["y"]
    n, d = x.shape
    keys = [f"row-{i:04d}" for i in range(n)]
    table = pa.table(
        {
            "id": keys,
            "y": pa.array(y.astype(np.int64)),
            "emb": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d),
            "label": pa.array(np.zeros(n, dtype=np.int64)),  # a decoy: the default label column
        }
    )
    path = data_root / f"renamed-{uuid.uuid4().hex[:8]}.parquet"
    pq.write_table(table, path, row_group_size=64)
    return path, keys


def test_parquet_with_other_column_names(client: Client, data_root: Path, finished_job: Job) -> None:
    path, keys = renamed_digits(data_root)
    options = {"label_column": "y", "key_column": "id", "embedding_column": "emb"}
    submitted = client.submit(path.as_uri(), config=TINY_CONFIG, dataset_options=options)
    assert submitted.dataset_options == options
    job = client.wait(submitted.job_id, timeout=300)
    assert job.state == "SUCCEEDED", job.error
    assert job.dataset_options == options, "GetScoringJob echoes the options"
    scores = list(client.scores(job.job_id))
    assert sorted(s.key for s in scores) == keys
    npz_scores = {s.sample_id: s.score for s in client.scores(finished_job.job_id)}
    assert {s.sample_id: s.score for s in scores} == npz_scores, "the y column, not the decoy, labels"


def test_parquet_of_image_keys(client: Client, data_root: Path) -> None:
    folder = data_root / f"pq-images-{uuid.uuid4().hex[:8]}"
    (folder / "images").mkdir(parents=True)
    paths, labels = [], []
    for i in range(30):
        name = NAMES[i % 3]
        (folder / "images" / f"{i:02d}.png").write_bytes(png(solid(COLOURS[name], i % 7)))
        paths.append(f"images/{i:02d}.png")
        labels.append(NAMES[(i + 1) % 3] if i in (5, 13) else name)
    table = pa.table({"path": paths, "cls": labels})
    pq.write_table(table, folder / "batch.parquet", row_group_size=8)
    options = {"label_column": "cls", "image_key_column": "path"}
    job = client.wait(
        client.submit(
            (folder / "batch.parquet").as_uri(), config=TINY_CONFIG, dataset_options=options
        ).job_id,
        timeout=300,
    )
    assert job.state == "SUCCEEDED", job.error
    assert job.run_info is not None
    assert job.run_info.skipped == ()
    scores = {s.key: s for s in client.scores(job.job_id)}
    assert sorted(scores) == paths, "without a key column the keys are the image keys"
    assert {key: s.given_label_name for key, s in scores.items()} == dict(zip(paths, labels, strict=True))


def multi_annotated_export(data_root: Path) -> tuple[Path, dict[str, str], dict[str, str]]:
    """30 tasks with two early annotations that agree and a later one that does not (the latest and
    the majority differ), plus tasks to skip; returns the export and each rule's expected labels."""
    folder = data_root / f"ls-options-{uuid.uuid4().hex[:8]}"
    (folder / "images").mkdir(parents=True)
    tasks, majority, latest = [], {}, {}
    for i in range(30):
        name, other = NAMES[i % 3], NAMES[(i + 1) % 3]
        (folder / "images" / f"{i:02d}.png").write_bytes(png(solid(COLOURS[name], i % 5)))
        anns = [
            annotation(100 + i, 1000 + i, name, "2026-11-30T10:01:00Z"),
            annotation(200 + i, 1000 + i, name, "2026-11-30T10:02:00Z"),
            annotation(300 + i, 1000 + i, other, "2026-11-30T10:09:00Z"),
            annotation(400 + i, 1000 + i, name, "2026-11-30T10:10:00Z", cancelled=True),
        ]
        tasks.append(task(1000 + i, f"images/{i:02d}.png", anns))
        majority[str(1000 + i)], latest[str(1000 + i)] = name, other
    cancelled = [annotation(900, 0, "cat", "2026-11-30T10:00:00Z", cancelled=True)]
    tasks += [task(1900 + i, "images/00.png", cancelled) for i in range(12)]
    tasks.append(task(1990, "images/00.png", []))
    no_choices = annotation(901, 1991, "cat", "2026-11-30T10:00:00Z")
    no_choices["result"] = [{"type": "rectanglelabels", "value": {"x": 1}}]
    tasks.append(task(1991, "images/00.png", [no_choices]))
    no_image = task(1992, "images/00.png", [annotation(902, 1992, "cat", "2026-11-30T10:00:00Z")])
    no_image["data"] = {"text": "no image here"}
    tasks.append(no_image)
    export_file = folder / "project-7-at-2026-11-30.json"
    export_file.write_text(json.dumps(tasks))
    return export_file, majority, latest


def test_label_studio_annotation_rules_and_the_skipped_tasks(client: Client, data_root: Path) -> None:
    export_file, majority, latest = multi_annotated_export(data_root)
    given: dict[str, dict[str, str]] = {}
    for rule in ("latest", "majority"):
        options = {"annotation_rule": rule}
        job = client.wait(
            client.submit(export_file.as_uri(), config=TINY_CONFIG, dataset_options=options).job_id,
            timeout=300,
        )
        assert job.state == "SUCCEEDED", job.error
        assert job.dataset_options == options
        given[rule] = {s.key: s.given_label_name for s in client.scores(job.job_id)}
        assert job.run_info is not None
        skipped = {item.reason: item for item in job.run_info.skipped}
        assert {reason: item.count for reason, item in skipped.items()} == {
            "NO_ANNOTATIONS": 1,
            "ALL_ANNOTATIONS_CANCELLED": 12,
            "NO_CHOICES_RESULT": 1,
            "NO_IMAGE": 1,
        }
        assert skipped["ALL_ANNOTATIONS_CANCELLED"].first_keys == tuple(str(1900 + i) for i in range(10))
        assert skipped["NO_IMAGE"].first_keys == ("1992",)
        assert all(item.description for item in skipped.values())
        summary = client.summary(job.job_id)
        assert summary.raw.run_info.skipped[1].reason == "ALL_ANNOTATIONS_CANCELLED"
    assert given["latest"] == latest
    assert given["majority"] == majority


def test_options_that_cannot_apply_are_invalid_argument(
    client: Client, data_root: Path, dataset_uri: str
) -> None:
    cases = [
        (dataset_uri, {"label_column": "y"}, "dataset.options.parquet", "OPTIONS_FORMAT_MISMATCH"),
        (
            dataset_uri,
            {"annotation_rule": "majority"},
            "dataset.options.label_studio",
            "OPTIONS_FORMAT_MISMATCH",
        ),
        (
            (data_root / "x.parquet").as_uri(),
            {"embedding_column": "emb", "image_key_column": "path"},
            "dataset.options.parquet.image_key_column",
            "INVALID_OPTION_COMBINATION",
        ),
        (
            (data_root / "x.parquet").as_uri(),
            {"label_column": "id", "key_column": "id"},
            "dataset.options.parquet.key_column",
            "INVALID_OPTION_COMBINATION",
        ),
    ]
    for uri, options, field, reason in cases:
        with pytest.raises(InvalidArgumentError) as caught:
            client.submit(uri, config=TINY_CONFIG, dataset_options=options)
        assert caught.value.reason == reason
        assert [violation.field for violation in caught.value.field_violations] == [field]
        assert field in caught.value.message


def test_a_column_the_file_lacks_fails_the_job_naming_the_option(client: Client, data_root: Path) -> None:
    path, _ = renamed_digits(data_root)
    job = client.wait(
        client.submit(
            path.as_uri(), config=TINY_CONFIG, dataset_options={"embedding_column": "embedding"}
        ).job_id,
        timeout=300,
    )
    assert job.state == "FAILED"
    assert job.error is not None
    assert (job.error.code, job.error.reason) == ("INVALID_ARGUMENT", "UNKNOWN_COLUMN")
    assert "dataset.options.parquet.embedding_column 'embedding' is not a column" in job.error.message
    assert "id, y, emb, label" in job.error.message


def test_the_cli_flags_set_the_options(
    capsys: pytest.CaptureFixture[str], data_root: Path, server: RunningServer
) -> None:
    path, _ = renamed_digits(data_root)
    flags = ["--label-column", "y", "--key-column", "id", "--embedding-column", "emb"]
    status = main(["--target", server.address, "score", path.as_uri(), *flags, *TINY_FLAGS, "--json"])
    out = capsys.readouterr().out
    assert status == 0, out
    document = json.loads(out)
    assert document["job"]["dataset_options"] == {
        "label_column": "y",
        "key_column": "id",
        "embedding_column": "emb",
    }
    assert document["job"]["state"] == "SUCCEEDED"
    status = main(
        ["--target", server.address, "score", path.as_uri(), "--annotation-rule", "majority", "--json"]
    )
    assert status != 0, "a Label Studio option on a Parquet file is refused"
    assert "dataset.options.label_studio" in capsys.readouterr().err
