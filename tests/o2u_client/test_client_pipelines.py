"""docs/pipelines.md's recipes: the Argo Workflows template is valid YAML of the expected shape,
and its `score`, `export` and `review` step commands, with the parameters filled in, run against a
real server and a loopback receiver of Label Studio's import API (tests/label_studio_receiver.py):
a rejected batch has gate exit 20 recorded, its suspects written as Label Studio tasks, and those
tasks posted by curl arrive in the project, the job's suspects most suspicious first, while a wrong
token fails the step (curl exit 22). The Airflow task's body and `push_to_label_studio` run against
the same server and receiver: the export arrives, and a refused import (unknown project, a body
that is not tasks, a wrong token) raises."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from o2u_client import Client
from tests.label_studio_receiver import TOKEN, LabelStudio
from tests.server_testing import RunningServer

DOC = Path(__file__).resolve().parents[2] / "docs" / "pipelines.md"
O2U = Path(sys.executable).parent / "o2u"


def _block(language: str) -> str:
    match = re.search(rf"```{language}\n(.*?)```", DOC.read_text(), re.S)
    assert match is not None, f"no {language} block in {DOC.name}"
    return match.group(1)


def _templates() -> dict[str, Any]:
    document = yaml.safe_load(_block("yaml"))
    assert document["apiVersion"] == "argoproj.io/v1alpha1"
    assert document["kind"] == "WorkflowTemplate"
    spec = document["spec"]
    templates = {t["name"]: t for t in spec["templates"]}
    assert spec["entrypoint"] in templates
    steps = [step["name"] for group in templates[spec["entrypoint"]]["steps"] for step in group]
    assert steps == ["score", "export", "review"]
    for step in steps:
        assert step in templates
    return templates


def _fill(command: str, values: dict[str, str], workdir: Path) -> str:
    filled = command.replace("/tmp/", f"{workdir}/")
    filled = re.sub(r"\{\{(workflow|inputs)\.parameters\.([\w-]+)\}\}", lambda m: values[m.group(2)], filled)
    assert "{{" not in filled, filled
    filled = re.sub(r"\bo2u ", f"{O2U} ", filled)
    return filled.replace("python3 ", f"{sys.executable} ")


def _require_curl() -> None:
    if shutil.which("curl") is None:
        message = "curl is not installed (apt-get install curl)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message}; CI must run the review step")
        pytest.skip(message)


def _assert_suspects_arrived(
    label_studio: LabelStudio, server: RunningServer, job_id: str, exported: list[dict[str, Any]]
) -> None:
    """One import reached project 1: the exported file's tasks, which are the job's suspects, most
    suspicious first, each predicted by the job."""
    assert len(label_studio.imports) == 1
    arrived = label_studio.imports[0]
    assert arrived.project == 1
    assert arrived.content_type == "application/json"
    assert arrived.tasks == exported
    with Client(server.address, timeout=20.0) as client:
        suspects = sorted((s for s in client.scores(job_id) if s.suspected), key=lambda s: s.rank)
    assert [task["data"]["o2u_key"] for task in arrived.tasks] == [s.key for s in suspects]
    assert [task["data"]["o2u_rank"] for task in arrived.tasks] == [s.rank for s in suspects]
    assert {p["model_version"] for task in arrived.tasks for p in task["predictions"]} == {job_id}


def test_argo_steps_score_gate_and_export(
    server: RunningServer, data_root: Path, tmp_path: Path, label_studio: LabelStudio
) -> None:
    templates = _templates()
    export = data_root / "exports" / f"{uuid.uuid4().hex}.json"
    values = {
        "o2u-target": server.address,
        "dataset-uri": (data_root / "digits.npz").as_uri(),
        "export-uri": export.as_uri(),
        "max-noise-rate": "0.0001",  # the digits have 10% of their labels flipped: rejected
        "label-studio-url": label_studio.url,
        "label-studio-project": "1",
    }
    score = templates["score"]["container"]
    assert score["command"] == ["sh", "-c"]
    result = subprocess.run(
        ["sh", "-c", _fill(score["args"][0], values, tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "decision").read_text().strip() == "rejected"
    job_id = (tmp_path / "job-id").read_text()
    verdict = json.loads((tmp_path / "verdict.json").read_text())
    assert verdict["passed"] is False
    assert verdict["job_id"] == job_id

    command = _fill(templates["export"]["container"]["args"][0], {**values, "job-id": job_id}, tmp_path)
    result = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    tasks = json.loads(export.read_text())
    assert tasks
    assert tasks[0]["predictions"][0]["model_version"] == job_id

    review = templates["review"]["container"]
    assert review["command"] == ["sh", "-c"]
    assert {"name": "exports", "mountPath": "/exports"} in review["volumeMounts"]
    assert review["env"][0]["name"] == "LABEL_STUDIO_TOKEN"
    command = _fill(review["args"][0], values, tmp_path)
    _require_curl()
    result = subprocess.run(
        ["sh", "-c", command],
        env={**os.environ, "LABEL_STUDIO_TOKEN": TOKEN},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["task_count"] == len(tasks)
    _assert_suspects_arrived(label_studio, server, job_id, tasks)
    refused = subprocess.run(
        ["sh", "-c", command],
        env={**os.environ, "LABEL_STUDIO_TOKEN": "not-the-token"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 22, refused.stderr  # curl --fail: the server answered 4xx (401)
    assert "401" in refused.stderr
    assert len(label_studio.imports) == 1


def test_airflow_task_body(
    server: RunningServer, data_root: Path, tmp_path: Path, label_studio: LabelStudio
) -> None:
    source = _block("python").replace("from airflow.decorators import task\n", "").replace("@task\n", "")
    source = source.replace('"o2u.o2u.svc:50051"', repr(server.address))
    namespace: dict[str, Any] = {}
    exec(compile(source, str(DOC), "exec"), namespace)
    export = data_root / "exports" / f"{uuid.uuid4().hex}.json"
    outcome = namespace["gate_batch"]((data_root / "digits.npz").as_uri(), export.as_uri(), 0.0001)
    assert outcome["passed"] is False
    assert outcome["reasons"]
    exported = json.loads(export.read_text())
    assert exported[0]["predictions"][0]["model_version"] == outcome["job_id"]

    push = namespace["push_to_label_studio"]
    answer = push(str(export), label_studio.url, 1, TOKEN)
    assert set(answer) == {
        "task_count",
        "annotation_count",
        "prediction_count",
        "duration",
        "file_upload_ids",
        "could_be_tasks_list",
        "found_formats",
        "data_columns",
    }
    assert answer["task_count"] == answer["annotation_count"] == answer["prediction_count"] == len(exported)
    _assert_suspects_arrived(label_studio, server, outcome["job_id"], exported)

    not_tasks = tmp_path / "outcome.json"
    not_tasks.write_text(json.dumps(outcome))
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    for path, project, token, status in [
        (export, 2, TOKEN, 404),
        (export, 1, "not-the-token", 401),
        (not_tasks, 1, TOKEN, 400),
        (empty, 1, TOKEN, 400),
    ]:
        with pytest.raises(urllib.error.HTTPError) as raised:
            push(str(path), label_studio.url, project, token)
        with raised.value as refusal:
            assert refusal.code == status, path
            assert json.load(refusal)["detail"]
    assert len(label_studio.imports) == 1
