"""Monitoring wiring of the chart: the Services and the ServiceMonitor/PodMonitor select the right
objects and label series with the job the alerts select on, every alert has a runbook section in
docs/operations.md, and the Grafana dashboard is well formed and shipped identically in the chart
and under docs/."""

from __future__ import annotations

import json
import re

from chart_rendering import (
    CHART_DIR,
    NAMESPACE,
    POD_MONITOR_VALUES,
    ROOT,
    deployment,
    full_values,
    labels_of,
    of_kind,
    one,
    render,
    server_container,
)


def test_services_and_monitors_select_the_right_objects() -> None:
    for values in (full_values(), POD_MONITOR_VALUES):
        objects = render(values)
        pod_labels = deployment(objects)["spec"]["template"]["metadata"]["labels"]
        services = {s["metadata"]["name"]: s for s in of_kind(objects, "Service")}
        for service in services.values():
            selector = service["spec"]["selector"]
            assert selector.items() <= pod_labels.items()
            assert selector["app.kubernetes.io/component"] == "server"
            for port in service["spec"]["ports"]:
                assert port["targetPort"] in {p["name"] for p in server_container(objects)["ports"]}
        monitors = of_kind(objects, "ServiceMonitor") + of_kind(objects, "PodMonitor")
        assert len(monitors) == 1
        monitor = monitors[0]
        wanted = monitor["spec"]["selector"]["matchLabels"]
        if monitor["kind"] == "ServiceMonitor":
            matching = [name for name, s in services.items() if wanted.items() <= labels_of(s).items()]
            assert len(matching) == 1
            assert [p["name"] for p in services[matching[0]]["spec"]["ports"]] == ["metrics"]
            endpoints = monitor["spec"]["endpoints"]
        else:
            assert wanted.items() <= pod_labels.items()
            endpoints = monitor["spec"]["podMetricsEndpoints"]
        # The alerts select series by this job label.
        fullname = deployment(objects)["metadata"]["name"]
        assert endpoints[0]["relabelings"] == [
            {"action": "replace", "targetLabel": "job", "replacement": fullname}
        ]
        for rule in one(objects, "PrometheusRule")["spec"]["groups"][0]["rules"]:
            if "kube_deployment_" in rule["expr"]:  # kube-state-metrics names the Deployment
                assert f'deployment="{fullname}"' in rule["expr"]
            else:
                assert f'job="{fullname}"' in rule["expr"]
            assert f'namespace="{NAMESPACE}"' in rule["expr"]


def test_alerts_carry_runbooks_documented_in_operations() -> None:
    operations = (ROOT / "docs" / "operations.md").read_text()
    rule = one(render(full_values()), "PrometheusRule")
    alerts = rule["spec"]["groups"][0]["rules"]
    names = {a["alert"] for a in alerts}
    assert {"O2UServerDown", "O2UJobsFailing", "O2UQueueBacklogGrowing", "O2UNoTrainingProgress"} <= names
    for alert in alerts:
        annotations = alert["annotations"]
        assert {"summary", "description", "runbook", "runbook_url"} <= set(annotations)
        anchor = alert["alert"].lower()
        assert annotations["runbook_url"].endswith("docs/operations.md#" + anchor)
        assert re.search(rf"^#+ {alert['alert']}$", operations, re.M), (
            f"no runbook section for {alert['alert']}"
        )
        assert alert["labels"]["severity"] in {"critical", "warning"}


def test_dashboard_is_shipped_identically() -> None:
    chart_copy = (CHART_DIR / "dashboards" / "o2u.json").read_text()
    assert (ROOT / "docs" / "grafana-dashboard.json").read_text() == chart_copy
    configmap = one(render({"grafanaDashboard": {"enabled": True}}), "ConfigMap", "o2u-dashboard")
    assert labels_of(configmap)["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["o2u.json"]) == json.loads(chart_copy)


def test_dashboard_json_is_well_formed() -> None:
    dashboard = json.loads((CHART_DIR / "dashboards" / "o2u.json").read_text())
    assert dashboard["uid"] == "o2u-scoring"
    variables = [v["name"] for v in dashboard["templating"]["list"]]
    assert variables[:4] == ["datasource", "namespace", "job", "instance"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    occupied: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {(grid["x"] + dx, grid["y"] + dy) for dx in range(grid["w"]) for dy in range(grid["h"])}
        assert not cells & occupied, f"panel {panel['title']} overlaps another"
        occupied |= cells
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["description"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs))
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            for variable in ("namespace", "job", "instance"):
                assert f'{variable}=~"${variable}"' in target["expr"], (panel["title"], variable)
