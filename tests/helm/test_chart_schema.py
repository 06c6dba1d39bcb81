"""values.schema.json describes every value the chart reads and rejects bad ones before anything
renders: wrong types, out-of-range ports and counts, unknown keys, settings the server does not
have, and security settings that would run the server as root."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from typing import Any

import helm_python as helm
import pytest
import yaml
from chart_rendering import CHART_DIR, full_values, loaded_chart, render_files

SCHEMA = json.loads((CHART_DIR / "values.schema.json").read_text())


def leaf_paths(values: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    if isinstance(values, dict) and values:
        for key, value in values.items():
            yield from leaf_paths(value, (*prefix, str(key)))
    else:
        yield prefix


def schema_at(path: tuple[str, ...]) -> dict[str, Any] | None:
    """The schema node describing `path`, or None if the schema does not name it."""
    node: dict[str, Any] = SCHEMA
    for key in path:
        properties = node.get("properties", {})
        if key in properties:
            node = properties[key]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        elif node.get("type") == "object" and node.get("additionalProperties", True) is True:
            return node  # a free-form Kubernetes object (affinity, securityContext extras, ...)
        else:
            return None
    return node


def with_value(path: str, value: Any) -> dict[str, Any]:
    values: dict[str, Any] = copy.deepcopy(full_values())
    keys = path.split(".")
    node: dict[str, Any] = values
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    return values


@pytest.mark.parametrize("source", ["values.yaml", "ci/full-values.yaml"])
def test_schema_names_every_value(source: str) -> None:
    values = yaml.safe_load((CHART_DIR / source).read_text())
    missing = [".".join(p) for p in leaf_paths(values) if schema_at(p) is None]
    assert missing == []


def test_schema_closes_every_fixed_object() -> None:
    """Objects the chart defines (not pass-through Kubernetes objects) reject unknown keys."""
    open_objects = {"affinity", "podSecurityContext", "securityContext"}

    def walk(node: dict[str, Any], path: str) -> Iterator[str]:
        if node.get("type") == "object" and "properties" in node:
            if (
                node.get("additionalProperties", True) is not False
                and path.split(".")[-1] not in open_objects
            ):
                yield path
            for key, child in node["properties"].items():
                yield from walk(child, f"{path}.{key}" if path else key)

    assert list(walk(SCHEMA, "")) == []


def test_defaults_and_full_values_are_valid() -> None:
    with loaded_chart() as chart:
        chart.validate_schema({})
        chart.validate_schema(full_values())


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("service.grpcPort", 70000),
        ("metrics.port", "9464"),
        ("config.device", "tpu"),
        ("config.listen_address", "0.0.0.0:1"),  # chart-managed, not a config key
        ("config.max_queued_jobs", 0),
        ("config.s3_endpoint", "https://minio:9000"),
        ("config.data_roots", ["relative/path"]),
        ("gpu.count", 0),
        ("image.pullPolicy", "Sometimes"),
        ("image.digest", "latest"),
        ("securityContext.runAsNonRoot", False),
        ("securityContext.allowPrivilegeEscalation", True),
        ("podSecurityContext.runAsUser", 0),
        ("metrics.serviceMonitor.interval", "30 seconds"),
        ("prometheusRule.jobsFailing.ratio", 1.5),
        ("persistence.accessModes", ["ReadOnlyMany"]),
        ("persistence.size", "lots"),
        ("replicaCount", -1),
        ("database.url", "mysql://o2u@db/o2u"),
        ("checkpoints.uri", "gs://bucket/prefix"),
        ("tls.clientCA.enabeld", True),
    ],
)
def test_schema_rejects_bad_values(path: str, value: Any) -> None:
    values = with_value(path, value)
    leaf = path.split(".")[-1]
    with loaded_chart() as chart, pytest.raises(helm.HelmValuesError) as raised:
        chart.validate_schema(values)
    assert leaf in str(raised.value) or path.split(".")[0] in str(raised.value)
    # Rendering (what `helm install` does) refuses the same values.
    with pytest.raises(helm.HelmError):
        render_files(values)


@pytest.mark.parametrize(
    ("database", "checkpoints"),
    [
        ("", ""),
        ("postgresql://o2u@db:5432/o2u", ""),
        ("", "s3://checkpoints/o2u"),
        ("sqlite:///x.db", "s3://c/o"),
    ],
)
def test_more_than_one_replica_needs_postgresql_and_shared_checkpoints(
    database: str, checkpoints: str
) -> None:
    values = {"replicaCount": 2, "database": {"url": database}, "checkpoints": {"uri": checkpoints}}
    with loaded_chart() as chart, pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)
    with pytest.raises(helm.HelmError):
        render_files(values)
    values["database"]["url"], values["checkpoints"]["uri"] = (
        "postgresql://o2u@db:5432/o2u",
        "s3://checkpoints/o2u",
    )
    with loaded_chart() as chart:
        chart.validate_schema(values)


def test_values_examples_in_the_operations_guide_are_valid() -> None:
    text = (CHART_DIR.parents[1] / "docs" / "operations.md").read_text()
    blocks = [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    examples = [b for b in blocks if isinstance(b, dict) and "apiVersion" not in b]
    assert len(examples) >= 2
    with loaded_chart() as chart:
        for example in examples:
            chart.validate_schema(example)
            assert render_files(example)
