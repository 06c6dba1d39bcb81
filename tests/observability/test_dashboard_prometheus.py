"""End to end: a real Prometheus scrapes a live o2u server while a job runs, then every query of
the Grafana dashboard, with its template variables resolved the way Grafana resolves them, returns
data through the Prometheus HTTP API, and the chart's alert rules pass `promtool check rules`,
load into Prometheus and evaluate without error.

Substitutions: `$namespace`, `$job` and `$instance` take the first value their own
`label_values(...)` query returns from this Prometheus; `$window` takes its default; and
`$__rate_interval` becomes 5m, a window that covers the whole test (Grafana derives it from the
scrape interval and the panel's resolution), so every rate sees the job's increments.
The GPU memory panel is exempt from returning data only when torch sees no CUDA device (the
server exports o2u_device_memory_bytes only with CUDA); it must then return nothing at all."""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_testing import JOB, NAMESPACE, ROOT, Prometheus, chart_alert_groups, require_tool

DASHBOARD = json.loads((ROOT / "helm" / "o2u" / "dashboards" / "o2u.json").read_text())
RATE_INTERVAL = "5m"
GPU_ONLY_METRICS = ("o2u_device_memory_bytes",)
LABEL_VALUES = re.compile(r"^label_values\((?:(?P<selector>.+),\s*)?(?P<label>[a-zA-Z_]\w*)\)$")


def panels() -> list[dict[str, Any]]:
    found = [p for p in DASHBOARD["panels"] if p["type"] != "row"]
    found += [child for row in DASHBOARD["panels"] if row["type"] == "row" for child in row.get("panels", [])]
    return found


def substitute(text: str, variables: dict[str, str]) -> str:
    # Longest names first, so $__rate_interval is not read as $__rate followed by text.
    for name in sorted(variables, key=len, reverse=True):
        text = text.replace(f"${{{name}}}", variables[name]).replace(f"${name}", variables[name])
    assert "$" not in text, f"unresolved variable in {text}"
    return text


def resolve_variables(prometheus: Prometheus) -> dict[str, str]:
    """Values for every dashboard variable, each query variable from its own query."""
    variables: dict[str, str] = {"__rate_interval": RATE_INTERVAL}
    for variable in DASHBOARD["templating"]["list"]:
        name, kind = variable["name"], variable["type"]
        if kind == "datasource":
            assert variable["query"] == "prometheus"
        elif kind == "custom":
            variables[name] = variable["current"]["value"]
            assert variables[name] in variable["query"].split(",")
        else:
            assert kind == "query", f"variable {name} has unsupported type {kind}"
            match = LABEL_VALUES.match(substitute(variable["query"]["query"], variables))
            assert match, f"variable {name}: expected label_values(...), got {variable['query']}"
            params = {"match[]": match["selector"]} if match["selector"] else {}
            values = prometheus.api(f"label/{match['label']}/values", **params)
            assert values, f"variable {name} has no values: {variable['query']['query']}"
            variables[name] = values[0]
    return variables


def panel_ids() -> list[str]:
    return [p["title"] for p in panels()]


def test_dashboard_variables_resolve_to_the_scraped_server(prometheus: Prometheus) -> None:
    variables = resolve_variables(prometheus)
    assert variables["namespace"] == NAMESPACE
    assert variables["job"] == JOB
    assert variables["instance"].startswith("127.0.0.1:")


@pytest.mark.parametrize("title", panel_ids())
def test_every_panel_query_returns_data(prometheus: Prometheus, title: str) -> None:
    panel = next(p for p in panels() if p["title"] == title)
    variables = resolve_variables(prometheus)
    assert panel["targets"], f"panel {title} has no queries"
    for target in panel["targets"]:
        expression = substitute(target["expr"], variables)
        result = prometheus.query(expression)
        if any(metric in expression for metric in GPU_ONLY_METRICS) and not torch.cuda.is_available():
            assert result == [], "a CPU-only server must not export GPU metrics"
            continue
        assert result, f"panel {title!r}: no data for {expression}"
        values = [float(sample["value"][1]) for sample in result]
        assert any(math.isfinite(v) for v in values), f"panel {title!r}: only NaN/Inf for {expression}"


def test_rules_pass_promtool(rules_file: Path) -> None:
    promtool = require_tool("promtool")
    checked = subprocess.run([promtool, "check", "rules", str(rules_file)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout


def test_rules_load_and_evaluate_in_prometheus(prometheus: Prometheus) -> None:
    expected = {rule["alert"]: rule for group in chart_alert_groups() for rule in group["rules"]}
    for rule in expected.values():
        prometheus.query(rule["expr"])  # raises unless the API evaluates it
    # Prometheus evaluates every group each second; all rules must load and report healthy.
    loaded = prometheus.api("rules", type="alert")
    rules = {rule["name"]: rule for group in loaded["groups"] for rule in group["rules"]}
    assert set(rules) == set(expected)
    for name, rule in rules.items():
        assert rule["health"] == "ok", (name, rule.get("lastError"))
    # The server is up and training went fine: nothing may be firing or pending.
    assert {name: rule["state"] for name, rule in rules.items()} == dict.fromkeys(rules, "inactive")


def test_server_down_alert_sees_a_missing_target(prometheus: Prometheus) -> None:
    expression = next(
        rule["expr"]
        for group in chart_alert_groups()
        for rule in group["rules"]
        if rule["alert"] == "O2UServerDown"
    )
    assert prometheus.query(expression) == []
    assert prometheus.query(expression.replace(f'job="{JOB}"', 'job="o2u-elsewhere"')) != []
