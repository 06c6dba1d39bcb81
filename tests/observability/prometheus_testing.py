"""Helpers of the observability tests: a Prometheus server process with its HTTP API, the chart's
alert rules rendered for a test release, and the labels a Kubernetes scrape would attach."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

ROOT = Path(__file__).resolve().parents[2]
# Labels a Kubernetes scrape would attach; the chart's alerts select on exactly these.
NAMESPACE = "o2u-test"
JOB = "o2u"
DATASET = "blobs.npz"


def require_tool(name: str) -> str:
    """Path of a Prometheus binary; skip without it, except in CI where it must be installed."""
    path = shutil.which(name)
    if path is None:
        reason = f"`{name}` is not installed (Debian package `prometheus`)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}, and CI must run this test")
        pytest.skip(reason)
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def chart_alert_groups() -> list[dict[str, Any]]:
    """The alert groups of the chart's PrometheusRule, rendered for release `o2u` in NAMESPACE."""
    import helm_python as helm

    with helm.Chart.load(str(ROOT / "helm" / "o2u")) as chart:
        rendered = chart.render({"prometheusRule": {"enabled": True}}, name=JOB, namespace=NAMESPACE)
    rule = yaml.safe_load(rendered["o2u/templates/prometheusrule.yaml"])
    groups: list[dict[str, Any]] = rule["spec"]["groups"]
    return groups


class Prometheus:
    """A Prometheus server process and its HTTP API."""

    def __init__(self, url: str, process: subprocess.Popen[bytes], log: Path) -> None:
        self.url = url
        self.process = process
        self.log = log

    def api(self, path: str, **params: Any) -> Any:
        response = requests.get(f"{self.url}/api/v1/{path}", params=params, timeout=30)
        body = response.json()
        assert response.status_code == 200, (path, params, body)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expression: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expression)
        assert data["resultType"] == "vector", (expression, data["resultType"])
        result: list[dict[str, Any]] = data["result"]
        return result

    def wait_for(self, expression: str, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Poll until `expression` returns a non-empty vector."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expression)
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"no result for {expression} after {timeout} s:\n{self.log_tail()}")
            time.sleep(0.5)

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])
