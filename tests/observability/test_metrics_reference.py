"""The metrics reference in docs/operations.md matches what a live server exports after a job
(every o2u_* family documented with its type and labels, nothing documented that is not exported),
and the dashboard and the alerts use only documented metrics."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

import torch
from prometheus_client.parser import text_string_to_metric_families
from prometheus_testing import ROOT, chart_alert_groups

from o2u.v1 import scoring_pb2 as pb

if TYPE_CHECKING:
    from tests.server_testing import RunningServer

CUDA_ONLY = {"o2u_device_memory_bytes"}
TLS_ONLY = {"o2u_tls_certificate_expiry_timestamp_seconds"}  # tests/o2u_server/api/test_certificates.py
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def documented_metrics() -> dict[str, tuple[str, str]]:
    """Metric name -> (type, labels cell) from the metrics reference table."""
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text.split("## Metrics reference", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, tuple[str, str]] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = (cells[1], cells[2])
    return rows


def exported_name(family_name: str, family_type: str) -> str:
    # The parser strips `_total` from counter family names; the exposition carries it.
    return family_name + "_total" if family_type == "counter" else family_name


def test_live_metrics_match_the_reference(live_server: RunningServer, scored_job: pb.ScoringJob) -> None:
    documented = documented_metrics()
    exported: dict[str, tuple[str, set[str]]] = {}
    for family in text_string_to_metric_families(live_server.scrape()):
        # prometheus-client adds a `<name>_created` gauge (creation time) per counter and histogram.
        if not family.name.startswith("o2u_") or family.name.endswith("_created"):
            continue
        labels = {
            name for sample in family.samples for name in sample.labels if name not in ("le", "quantile")
        }
        exported[exported_name(family.name, family.type)] = (family.type, labels)
    expected = {name for name in documented if name.startswith("o2u_")} - TLS_ONLY
    if not torch.cuda.is_available():
        expected -= CUDA_ONLY
    assert set(exported) == expected
    for name, (kind, labels) in exported.items():
        documented_kind, documented_labels = documented[name]
        assert kind == documented_kind, name
        for label in labels:
            assert f"`{label}`" in documented_labels, f"label {label} of {name} is not documented"


def metric_names(expression: str) -> set[str]:
    names = set(re.findall(r"\b((?:o2u|process|python)_[a-z_]+)\b", expression))
    stripped = set()
    for name in names:
        for suffix in HISTOGRAM_SUFFIXES:
            if name.endswith(suffix) and not name.endswith("_total"):
                name = name.removesuffix(suffix)
                break
        stripped.add(name)
    return stripped


def test_dashboard_and_alerts_use_documented_metrics() -> None:
    documented = set(documented_metrics())
    dashboard = json.loads((ROOT / "helm" / "o2u" / "dashboards" / "o2u.json").read_text())
    expressions = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    expressions += [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    expressions += [r["expr"] for g in chart_alert_groups() for r in g["rules"]]
    used = set().union(*(metric_names(e) for e in expressions))
    assert "o2u_jobs_finished_total" in used
    # process_* are prometheus-client's standard process metrics, documented as one row.
    undocumented = {
        name
        for name in used
        if name not in documented and not (name.startswith("process_") and "process_*" in documented)
    }
    assert undocumented == set()
