"""Rendering the o2u Helm chart offline for tests: helm-python-sdk renders the templates with given
values, and the manifests come back as parsed Kubernetes objects, plus small lookups the chart
tests share (the server container, its env, objects by kind)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "helm" / "o2u"
FULL_VALUES_FILE = CHART_DIR / "ci" / "full-values.yaml"
RELEASE = "o2u"
NAMESPACE = "o2u-test"
# The Kubernetes version rendered objects are validated against (kubernetes-validate ships it).
KUBERNETES_VERSION = "1.35.0"
# Kinds from the Prometheus Operator: not in the Kubernetes schemas, checked structurally instead.
OPERATOR_KINDS = frozenset({"ServiceMonitor", "PodMonitor", "PrometheusRule"})

Manifest = dict[str, Any]
# The PodMonitor instead of the ServiceMonitor, with the alerts.
POD_MONITOR_VALUES: dict[str, Any] = {
    "metrics": {"podMonitor": {"enabled": True}},
    "prometheusRule": {"enabled": True},
}


@contextmanager
def loaded_chart() -> Iterator[helm.Chart]:
    chart = helm.Chart.load(str(CHART_DIR))
    try:
        yield chart
    finally:
        chart.close()


def full_values() -> dict[str, Any]:
    values = helm.values_from_yaml(FULL_VALUES_FILE.read_text())
    assert isinstance(values, dict)
    return values


def render_files(values: dict[str, Any] | None = None, *, namespace: str = NAMESPACE) -> dict[str, str]:
    """Template path -> rendered text, NOTES.txt included."""
    with loaded_chart() as chart:
        rendered = chart.render(values or {}, name=RELEASE, namespace=namespace, is_install=True)
    assert isinstance(rendered, dict)
    return rendered


def render(values: dict[str, Any] | None = None, *, namespace: str = NAMESPACE) -> list[Manifest]:
    """Every Kubernetes object the chart renders with `values` (defaults when None)."""
    objects: list[Manifest] = []
    for path, text in sorted(render_files(values, namespace=namespace).items()):
        if not path.endswith((".yaml", ".yml")):
            continue
        for document in yaml.safe_load_all(text):
            if document is not None:
                assert isinstance(document, dict), f"{path} renders a non-object document"
                objects.append(document)
    return objects


def labels_of(obj: Manifest) -> dict[str, str]:
    labels = obj["metadata"].get("labels", {})
    assert isinstance(labels, dict)
    return labels


def of_kind(objects: list[Manifest], kind: str) -> list[Manifest]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    found = [o for o in of_kind(objects, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def deployment(objects: list[Manifest]) -> Manifest:
    return one(objects, "Deployment")


def server_container(objects: list[Manifest]) -> Manifest:
    containers = deployment(objects)["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["server"]
    container = containers[0]
    assert isinstance(container, dict)
    return container


def container_env(container: Manifest) -> dict[str, Manifest]:
    return {e["name"]: e for e in container.get("env", [])}


def container_port(container: Manifest, name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    port = ports[name]
    assert isinstance(port, int)
    return port


def pod_volumes(objects: list[Manifest]) -> dict[str, Manifest]:
    return {v["name"]: v for v in deployment(objects)["spec"]["template"]["spec"]["volumes"]}


def mount_for(container: Manifest, path: str) -> Manifest | None:
    """The volume mount whose mount path contains `path` (deepest first)."""
    mounts = sorted(container.get("volumeMounts", []), key=lambda m: len(m["mountPath"]), reverse=True)
    for mount in mounts:
        mount_path = mount["mountPath"].rstrip("/")
        if path == mount_path or path.startswith(mount_path + "/"):
            return dict(mount)
    return None
