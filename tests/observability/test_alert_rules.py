"""The chart's alerts fire when they should and stay quiet when they should not: each case feeds
synthetic series to `promtool test rules` with the rules as the chart renders them (default
thresholds). Annotations are left out of these rule files on purpose: they are checked by
`promtool check rules` and in the chart tests, and here only the firing logic matters."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_testing import JOB, NAMESPACE, chart_alert_groups, require_tool

TARGET = f'namespace="{NAMESPACE}", job="{JOB}", instance="10.0.0.7:9464"'
SCOPE = {"namespace": NAMESPACE, "job": JOB}


def series(metric: str, values: str, **labels: str) -> dict[str, str]:
    extra = "".join(f', {key}="{value}"' for key, value in labels.items())
    return {"series": f"{metric}{{{TARGET}{extra}}}", "values": values}


def second_replica(metric: str, values: str) -> dict[str, str]:
    return {
        "series": f'{metric}{{namespace="{NAMESPACE}", job="{JOB}", instance="10.0.0.8:9464"}}',
        "values": values,
    }


SECOND = {**SCOPE, "instance": "10.0.0.8:9464"}
# kube-state-metrics' series name the Deployment, and its own scrape job.
_UNAVAILABLE = (
    f'kube_deployment_status_replicas_unavailable{{{{namespace="{NAMESPACE}", deployment="{{deployment}}", '
    'job="kube-state-metrics"}}'
)
DEPLOYMENT = {"namespace": NAMESPACE, "deployment": JOB}


def firing(severity: str = "warning", **labels: str) -> list[dict[str, Any]]:
    return [{"exp_labels": {"severity": severity, **SCOPE, **labels}}]


# name -> (input series, [(eval time, alert, expected alerts)])
CASES: dict[str, tuple[list[dict[str, str]], list[tuple[str, str, list[dict[str, Any]]]]]] = {
    "server goes down": (
        [series("up", "1x5 0x15")],
        [("4m", "O2UServerDown", []), ("15m", "O2UServerDown", firing("critical"))],
    ),
    "server never scraped": (
        [{"series": 'up{namespace="elsewhere", job="other"}', "values": "1x20"}],
        [
            ("2m", "O2UServerDown", []),
            ("10m", "O2UServerDown", [{"exp_labels": {"severity": "critical", **SCOPE}}]),
        ],
    ),
    "half the jobs fail": (
        [
            series("o2u_jobs_finished_total", "0+1x30", state="failed"),
            series("o2u_jobs_finished_total", "0+1x30", state="succeeded"),
        ],
        [("20m", "O2UJobsFailing", firing())],
    ),
    "jobs succeed": (
        [
            series("o2u_jobs_finished_total", "0x30", state="failed"),
            series("o2u_jobs_finished_total", "0+1x30", state="succeeded"),
        ],
        [("20m", "O2UJobsFailing", [])],
    ),
    "queue keeps growing": (
        [series("o2u_jobs_queued", "1+1x60")],
        [
            ("10m", "O2UQueueBacklogGrowing", []),
            ("40m", "O2UQueueBacklogGrowing", firing()),
        ],
    ),
    "queue drains": (
        [series("o2u_jobs_queued", "10-1x10 0x50")],
        [("40m", "O2UQueueBacklogGrowing", [])],
    ),
    "queue nearly full": (
        [series("o2u_jobs_queued", "85x20")],
        [("10m", "O2UQueueNearlyFull", firing())],
    ),
    "training stalls": (
        [
            series("o2u_replica_jobs_running", "1x60"),
            series("o2u_training_samples_total", "0+100x5 500x55", stage="cyclic"),
        ],
        [
            ("20m", "O2UNoTrainingProgress", []),
            ("45m", "O2UNoTrainingProgress", firing(instance="10.0.0.7:9464")),
        ],
    ),
    "training progresses": (
        [
            series("o2u_replica_jobs_running", "1x60"),
            series("o2u_training_samples_total", "0+100x60", stage="cyclic"),
        ],
        [("45m", "O2UNoTrainingProgress", [])],
    ),
    "job just started after an idle hour": (
        [
            series("o2u_replica_jobs_running", "0x40 1x20"),
            series("o2u_training_samples_total", "0x60", stage="cyclic"),
        ],
        [("50m", "O2UNoTrainingProgress", [])],
    ),
    "queued jobs, idle workers, no claims": (
        [
            series("o2u_queue_oldest_job_age_seconds", "0+60x60"),
            series("o2u_job_claims_total", "3x60"),
            series("o2u_replica_worker_slots", "1x60"),
            series("o2u_replica_jobs_running", "0x60"),
            second_replica("o2u_replica_worker_slots", "1x60"),
            second_replica("o2u_replica_jobs_running", "0x60"),
        ],
        [("15m", "O2UJobsNotClaimed", []), ("30m", "O2UJobsNotClaimed", firing("critical"))],
    ),
    "queued jobs while every worker is busy": (
        [
            series("o2u_queue_oldest_job_age_seconds", "0+60x60"),
            series("o2u_job_claims_total", "3x60"),
            series("o2u_replica_worker_slots", "1x60"),
            series("o2u_replica_jobs_running", "1x60"),
        ],
        [("30m", "O2UJobsNotClaimed", [])],
    ),
    "queued jobs are being claimed": (
        [
            series("o2u_queue_oldest_job_age_seconds", "0+60x60"),
            series("o2u_job_claims_total", "0+1x60"),
            series("o2u_replica_worker_slots", "1x60"),
            series("o2u_replica_jobs_running", "0x60"),
        ],
        [("30m", "O2UJobsNotClaimed", [])],
    ),
    "shared memory held by an idle server": (
        [
            series("o2u_shared_memory_used_bytes", "0x5 1073741824x60"),
            series("o2u_replica_jobs_running", "1x5 0x60"),
        ],
        [
            ("20m", "O2USharedMemoryHeld", []),
            ("45m", "O2USharedMemoryHeld", firing(instance="10.0.0.7:9464")),
        ],
    ),
    "shared memory held by a running job": (
        [series("o2u_shared_memory_used_bytes", "1073741824x60"), series("o2u_replica_jobs_running", "1x60")],
        [("45m", "O2USharedMemoryHeld", [])],
    ),
    "shared memory freed after each job": (
        [
            series("o2u_shared_memory_used_bytes", "1073741824x10 65536x50"),
            series("o2u_replica_jobs_running", "1x10 0x50"),
        ],
        [("55m", "O2USharedMemoryHeld", [])],
    ),
    "one replica of two goes down": (
        [series("up", "1x30"), second_replica("up", "1x5 0x25")],
        [
            ("4m", "O2UReplicaDown", []),
            ("15m", "O2UReplicaDown", [{"exp_labels": {"severity": "warning", **SECOND}}]),
            ("15m", "O2UServerDown", []),
        ],
    ),
    "every replica goes down": (
        [series("up", "1x5 0x25"), second_replica("up", "1x5 0x25")],
        [("15m", "O2UReplicaDown", []), ("15m", "O2UServerDown", firing("critical"))],
    ),
    "a replica stays pending": (
        [
            {"series": _UNAVAILABLE.format(deployment=JOB), "values": "0x5 1x30"},
            {"series": _UNAVAILABLE.format(deployment="other"), "values": "2x35"},
        ],
        [
            ("15m", "O2UReplicasUnavailable", []),
            ("25m", "O2UReplicasUnavailable", [{"exp_labels": {"severity": "warning", **DEPLOYMENT}}]),
        ],
    ),
    "a rollout's surge pod waits for a GPU past the progress deadline": (
        [
            {"series": _UNAVAILABLE.format(deployment=JOB), "values": "0x40"},
            {
                "series": f'kube_deployment_status_condition{{namespace="{NAMESPACE}", deployment="{JOB}", '
                'job="kube-state-metrics", condition="Progressing", status="false"}',
                "values": "0x10 1x30",
            },
        ],
        [
            ("20m", "O2UReplicasUnavailable", []),
            ("30m", "O2UReplicasUnavailable", [{"exp_labels": {"severity": "warning", **DEPLOYMENT}}]),
        ],
    ),
    "a rollout waits a few minutes for its new pod": (
        [{"series": _UNAVAILABLE.format(deployment=JOB), "values": "0x5 1x10 0x20"}],
        [("30m", "O2UReplicasUnavailable", []), ("14m", "O2UReplicasUnavailable", [])],
    ),
    "a backlog on two replicas is one alert": (
        [series("o2u_jobs_queued", "1+1x60"), second_replica("o2u_jobs_queued", "1+1x60")],
        [("40m", "O2UQueueBacklogGrowing", firing())],
    ),
    "the job store becomes unreachable": (
        [series("o2u_job_store_up", "1x5 0x20 1x10")],
        [
            ("6m", "O2UJobStoreUnreachable", []),
            ("10m", "O2UJobStoreUnreachable", firing("critical", instance="10.0.0.7:9464")),
            ("30m", "O2UJobStoreUnreachable", []),
        ],
    ),
    "the state volume fills": (
        [
            series("o2u_state_volume_free_bytes", "1000x10 400x10 100x20"),
            series("o2u_state_volume_min_free_bytes", "256x40"),
        ],
        [
            ("8m", "O2UStateVolumeLow", []),
            ("18m", "O2UStateVolumeLow", firing(instance="10.0.0.7:9464")),
            ("18m", "O2UStateVolumeFull", []),
            ("30m", "O2UStateVolumeFull", firing("critical", instance="10.0.0.7:9464")),
        ],
    ),
    "no floor on the state volume": (
        [series("o2u_state_volume_free_bytes", "0x30"), series("o2u_state_volume_min_free_bytes", "0x30")],
        [("20m", "O2UStateVolumeLow", []), ("20m", "O2UStateVolumeFull", [])],
    ),
    "a replica keeps losing leases": (
        [series("o2u_job_leases_lost_total", "0x10 1 2 3 3x30")],
        [
            ("11m", "O2UJobLeasesLost", []),
            ("15m", "O2UJobLeasesLost", firing(instance="10.0.0.7:9464")),
        ],
    ),
    "a lease lost now and then": (
        [series("o2u_job_leases_lost_total", "0x10 1x30 2x40")],
        [("60m", "O2UJobLeasesLost", [])],
    ),
    "training workers keep dying": (
        [series("o2u_training_worker_failures_total", "0x10 1x5 2x5 3x20")],
        [
            ("12m", "O2UTrainingWorkerFailures", []),
            ("25m", "O2UTrainingWorkerFailures", firing(instance="10.0.0.7:9464")),
        ],
    ),
    "webhooks fail": (
        [
            series("o2u_webhook_deliveries_total", "0+1x60", outcome="delivered"),
            series("o2u_webhook_deliveries_total", "0+3x60", outcome="timeout"),
        ],
        [("45m", "O2UWebhookDeliveriesFailing", firing())],
    ),
    "webhooks mostly delivered": (
        [
            series("o2u_webhook_deliveries_total", "0+9x60", outcome="delivered"),
            series("o2u_webhook_deliveries_total", "0+1x60", outcome="http_error"),
        ],
        [("45m", "O2UWebhookDeliveriesFailing", [])],
    ),
    "the certificate is not renewed": (
        # Expiry in 8 days from the start (time() is 0 then), a minute nearer every minute.
        [series("o2u_tls_certificate_expiry_timestamp_seconds", "691200x2000")],
        [
            ("30m", "O2UTLSCertificateExpiring", []),
            ("1d2h", "O2UTLSCertificateExpiring", firing(instance="10.0.0.7:9464")),
        ],
    ),
    "the certificate is renewed in time": (
        [series("o2u_tls_certificate_expiry_timestamp_seconds", "691200x100 4000000x100")],
        [("3h", "O2UTLSCertificateExpiring", [])],
    ),
    "server errors": (
        [
            series("o2u_grpc_requests_total", "0+100x30", method="GetScoringJob", code="OK"),
            series("o2u_grpc_requests_total", "0+10x30", method="GetScoringJob", code="INTERNAL"),
        ],
        [("20m", "O2URPCServerErrors", firing())],
    ),
    "client errors only": (
        [
            series("o2u_grpc_requests_total", "0+100x30", method="GetScoringJob", code="OK"),
            series("o2u_grpc_requests_total", "0+50x30", method="GetScoringJob", code="NOT_FOUND"),
        ],
        [("20m", "O2URPCServerErrors", [])],
    ),
}


def test_every_alert_has_a_firing_case() -> None:
    alerts = {rule["alert"] for group in chart_alert_groups() for rule in group["rules"]}
    fired = {alert for _, checks in CASES.values() for _, alert, expected in checks if expected}
    assert fired == alerts


@pytest.mark.parametrize("case", sorted(CASES))
def test_alert_logic(case: str, tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    groups = chart_alert_groups()
    for group in groups:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    inputs, checks = CASES[case]
    unit_test = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": inputs,
                "alert_rule_test": [
                    {"eval_time": at, "alertname": alert, "exp_alerts": expected}
                    for at, alert, expected in checks
                ],
            }
        ],
    }
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(unit_test, sort_keys=False))
    result = subprocess.run(
        [promtool, "test", "rules", "test.yaml"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
