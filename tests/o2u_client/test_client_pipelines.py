"""docs/pipelines.md's recipes: the Argo Workflows template is valid YAML of the expected shape,
and its `score` and `export` step commands, with the parameters filled in, run against a real
server (a rejected batch: gate exit 20 recorded, suspects written as Label Studio tasks); the
Airflow task's body runs against the same server."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import yaml

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


def test_argo_steps_score_gate_and_export(server: RunningServer, data_root: Path, tmp_path: Path) -> None:
    templates = _templates()
    export = data_root / "exports" / f"{uuid.uuid4().hex}.json"
    values = {
        "o2u-target": server.address,
        "dataset-uri": (data_root / "digits.npz").as_uri(),
        "export-uri": export.as_uri(),
        "max-noise-rate": "0.0001",  # the digits have 10% of their labels flipped: rejected
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
    review = templates["review"]["container"]["args"][0]
    assert "/api/projects/{{workflow.parameters.label-studio-project}}/import" in review


def test_airflow_task_body(server: RunningServer, data_root: Path) -> None:
    source = _block("python").replace("from airflow.decorators import task\n", "").replace("@task\n", "")
    source = source.replace('"o2u.o2u.svc:50051"', repr(server.address))
    namespace: dict[str, Any] = {}
    exec(compile(source, str(DOC), "exec"), namespace)
    export = data_root / "exports" / f"{uuid.uuid4().hex}.json"
    outcome = namespace["gate_batch"]((data_root / "digits.npz").as_uri(), export.as_uri(), 0.0001)
    assert outcome["passed"] is False
    assert outcome["reasons"]
    assert json.loads(export.read_text())[0]["predictions"][0]["model_version"] == outcome["job_id"]
