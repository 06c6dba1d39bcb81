"""The Helm chart lints, renders with default and with every-feature values, and every rendered
object is a valid Kubernetes object (kubernetes-validate, strict) with the scheduling, security and
secret wiring the service needs. Prometheus Operator kinds are not in the Kubernetes schemas; their
structure is checked here, their selection in test_chart_monitoring.py and their alert expressions
by promtool in tests/observability."""

from __future__ import annotations

import base64
import re
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from chart_rendering import (
    CHART_DIR,
    KUBERNETES_VERSION,
    NAMESPACE,
    OPERATOR_KINDS,
    POD_MONITOR_VALUES,
    Manifest,
    container_env,
    deployment,
    full_values,
    labels_of,
    mount_for,
    of_kind,
    one,
    pod_volumes,
    render,
    render_files,
    server_container,
)

from o2u_client.cli import build_parser

DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")
STANDARD_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version")


REPLICAS: dict[str, Any] = {
    "replicaCount": 3,
    "database": {"url": "postgresql://o2u@postgres.db.svc:5432/o2u", "existingSecret": "o2u-database"},
    "checkpoints": {"uri": "s3://o2u-checkpoints/prod"},
    "config": {"s3_endpoint": "minio.minio.svc:9000"},
}


def variants() -> dict[str, dict[str, Any]]:
    """Value sets that together switch every template branch on at least once."""
    return {
        "defaults": {},
        "full": full_values(),
        "pod-monitor": POD_MONITOR_VALUES,
        "replicas": REPLICAS,
        "cpu-ephemeral": {
            "gpu": {"enabled": False},
            "persistence": {"enabled": False},
            "config": {"device": "cpu"},
            "serviceAccount": {"create": False},
            "tests": {"enabled": False},
        },
        "existing-secrets": {
            "persistence": {"existingClaim": "o2u-state"},
            "s3Credentials": {"existingSecret": "minio-o2u"},
            "auth": {"enabled": True, "existingSecret": "o2u-token"},
            "tls": {"enabled": True, "secretName": "o2u-tls"},
        },
    }


def check_operator_object(obj: Manifest) -> None:
    """Minimal structural check of ServiceMonitor / PodMonitor / PrometheusRule."""
    assert obj["apiVersion"] == "monitoring.coreos.com/v1"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", obj["metadata"]["name"])
    spec = obj["spec"]
    if obj["kind"] in ("ServiceMonitor", "PodMonitor"):
        assert spec["selector"]["matchLabels"]
        assert spec["namespaceSelector"]["matchNames"] == [NAMESPACE]
        endpoints = spec["endpoints" if obj["kind"] == "ServiceMonitor" else "podMetricsEndpoints"]
        for endpoint in endpoints:
            assert endpoint["port"] == "metrics"
            assert endpoint["path"] == "/metrics"
            assert DURATION.match(endpoint["interval"])
            assert DURATION.match(endpoint["scrapeTimeout"])
            for relabeling in endpoint.get("relabelings", []) + endpoint.get("metricRelabelings", []):
                assert relabeling.get("action", "replace") in {
                    "replace",
                    "keep",
                    "drop",
                    "labeldrop",
                    "labelkeep",
                }
        return
    assert obj["kind"] == "PrometheusRule"
    for group in spec["groups"]:
        assert isinstance(group["name"], str)
        assert group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "record", "expr", "for", "labels", "annotations"}
            assert isinstance(rule["expr"], str)
            assert DURATION.match(rule.get("for", "0s"))
            for mapping in (rule.get("labels", {}), rule.get("annotations", {})):
                assert all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items())


@pytest.mark.parametrize("values_file", [None, "ci/full-values.yaml"])
def test_chart_lints_clean(values_file: str | None) -> None:
    values = full_values() if values_file else None
    report = helm.lint(
        str(CHART_DIR), values, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBERNETES_VERSION}"
    )
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == []


@pytest.mark.parametrize("variant", sorted(variants()))
def test_every_rendered_object_is_valid(variant: str) -> None:
    objects = render(variants()[variant])
    assert objects
    for obj in objects:
        for label in STANDARD_LABELS:
            assert labels_of(obj).get(label), f"{obj['kind']} {obj['metadata']['name']} lacks {label}"
        if obj["kind"] in OPERATOR_KINDS:
            check_operator_object(obj)
        else:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_default_render_objects() -> None:
    objects = render()
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "PersistentVolumeClaim",
        "Pod",
        "Service",
        "Service",
        "Service",
        "ServiceAccount",
    ]
    spec = deployment(objects)["spec"]
    # One writer on the SQLite job store: one replica, old pod gone before the new one starts.
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    claim = one(objects, "PersistentVolumeClaim")
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert pod_volumes(objects)["state"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_replicas_share_postgresql_and_object_storage() -> None:
    objects = render(REPLICAS)
    spec = deployment(objects)["spec"]
    assert spec["replicas"] == 3
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    assert of_kind(objects, "PersistentVolumeClaim") == [], "no volume: the state lives in PostgreSQL and S3"
    assert pod_volumes(objects)["state"] == {"name": "state", "emptyDir": {}}
    env = container_env(server_container(objects))
    assert env["O2U_DATABASE_URL"]["value"] == "postgresql://o2u@postgres.db.svc:5432/o2u"
    assert env["O2U_DATABASE_PASSWORD_FILE"]["value"] == "/etc/o2u/database/password"
    assert env["O2U_CHECKPOINT_URI"]["value"] == "s3://o2u-checkpoints/prod"
    assert pod_volumes(objects)["database"]["secret"]["secretName"] == "o2u-database"
    budget = one(objects, "PodDisruptionBudget")
    assert budget["spec"]["maxUnavailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"] == spec["selector"]["matchLabels"]
    headless = one(objects, "Service", f"{deployment(objects)['metadata']['name']}-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"] == spec["selector"]["matchLabels"]


def test_a_rollout_without_a_spare_gpu_replaces_one_pod_at_a_time() -> None:
    objects = render({**REPLICAS, "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}})
    assert deployment(objects)["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}


def test_a_changed_chart_secret_restarts_the_pods() -> None:
    """The server reads tokens and keys at start: a new value must roll the pods, as a config change does."""

    def annotations(values: dict[str, Any]) -> dict[str, str]:
        annotated: dict[str, str] = deployment(render(values))["spec"]["template"]["metadata"]["annotations"]
        return annotated

    first = annotations({"auth": {"enabled": True, "token": "first-token"}})
    assert annotations({"auth": {"enabled": True, "token": "first-token"}}) == first
    second = annotations({"auth": {"enabled": True, "token": "second-token"}})
    assert second["checksum/secrets"] != first["checksum/secrets"]
    assert second["checksum/config"] == first["checksum/config"]


def test_one_replica_on_postgresql_keeps_local_checkpoints_on_the_volume() -> None:
    objects = render({"database": {"url": "postgresql://o2u@postgres:5432/o2u"}})
    assert deployment(objects)["spec"]["strategy"] == {"type": "Recreate"}
    assert len(of_kind(objects, "PersistentVolumeClaim")) == 1
    assert of_kind(objects, "PodDisruptionBudget") == []


def test_full_render_has_every_feature() -> None:
    objects = render(full_values())
    kinds = {o["kind"] for o in objects}
    assert {"ServiceMonitor", "PrometheusRule", "Secret", "ConfigMap", "Pod"} <= kinds
    dashboards = [c for c in of_kind(objects, "ConfigMap") if labels_of(c).get("grafana_dashboard") == "1"]
    assert len(dashboards) == 1
    assert dashboards[0]["metadata"]["namespace"] == "monitoring"
    rule = one(objects, "PrometheusRule")
    assert labels_of(rule)["release"] == "kube-prometheus-stack"
    secrets = {s["metadata"]["name"]: s for s in of_kind(objects, "Secret")}
    assert set(secrets) == {"o2u-scoring-s3", "o2u-scoring-auth", "o2u-scoring-tenants"}
    tokens = base64.b64decode(secrets["o2u-scoring-tenants"]["data"]["tokens"]).decode()
    assert tokens == "team-a: team-a-random-token\nteam-b: team-b-random-token\n"
    spec = deployment(objects)["spec"]["template"]["spec"]
    assert spec["runtimeClassName"] == "nvidia"
    assert spec["priorityClassName"] == "ml-high"
    assert server_container(objects)["image"].endswith("@sha256:" + "0123456789abcdef" * 4)


def test_pod_security_is_restricted() -> None:
    for values in (None, full_values()):
        objects = render(values)
        pods = [deployment(objects)["spec"]["template"]["spec"]] + [
            p["spec"] for p in of_kind(objects, "Pod")
        ]
        for pod in pods:
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["runAsUser"] == 1000
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            assert pod["automountServiceAccountToken"] is False
            for container in pod["containers"]:
                context = container["securityContext"]
                assert context["allowPrivilegeEscalation"] is False
                assert context["readOnlyRootFilesystem"] is True
                assert context["capabilities"] == {"drop": ["ALL"]}
                assert context["runAsNonRoot"] is True
                tmp = mount_for(container, "/tmp")
                assert tmp is not None
                assert tmp["mountPath"] == "/tmp"
                volumes = {v["name"]: v for v in pod["volumes"]}
                assert "emptyDir" in volumes[tmp["name"]]
        # The only writable mounts of the server: its state, /tmp and shared memory.
        container = server_container(objects)
        writable = sorted(m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly"))
        assert writable == ["/dev/shm", "/tmp", "/var/lib/o2u"]


def test_gpu_scheduling() -> None:
    objects = render()
    container = server_container(objects)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    spec = deployment(objects)["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]

    full = render(full_values())
    spec = deployment(full)["spec"]["template"]["spec"]
    assert server_container(full)["resources"]["limits"]["nvidia.com/gpu"] == 2
    # GPU and general scheduling constraints are merged, not one replacing the other.
    assert spec["nodeSelector"]["topology.kubernetes.io/zone"] == "eu-west-1a"
    assert spec["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert {t["key"] for t in spec["tolerations"]} == {"nvidia.com/gpu", "dedicated"}

    cpu = render({"gpu": {"enabled": False}, "config": {"device": "cpu"}})
    assert "nvidia.com/gpu" not in server_container(cpu)["resources"].get("limits", {})
    assert "nodeSelector" not in deployment(cpu)["spec"]["template"]["spec"]


def test_helm_test_hook_checks_health_through_the_service() -> None:
    for values in (None, full_values()):
        objects = render(values)
        pod = one(objects, "Pod")
        assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
        assert pod["spec"]["restartPolicy"] == "Never"
        command = pod["spec"]["containers"][0]["command"]
        assert command[0] == "o2u-healthcheck"
        service = one(objects, "Service", deployment(objects)["metadata"]["name"])
        port = service["spec"]["ports"][0]["port"]
        assert command[command.index("--address") + 1] == f"{service['metadata']['name']}:{port}"
        container = pod["spec"]["containers"][0]
        for argument in command:
            if argument.startswith("/etc/o2u/"):
                assert mount_for(container, argument) is not None, (
                    f"{argument} is not mounted in the test pod"
                )


def test_tls_and_token_secrets_are_mounted() -> None:
    objects = render(full_values())
    container = server_container(objects)
    env = container_env(container)
    volumes = pod_volumes(objects)
    expected_secrets = {
        "O2U_TLS_CERT_FILE": "o2u-tls",
        "O2U_TLS_KEY_FILE": "o2u-tls",
        "O2U_TLS_CLIENT_CA_FILE": "o2u-client-ca",
        "O2U_AUTH_TOKEN_FILE": "o2u-scoring-auth",
    }
    for name, secret in expected_secrets.items():
        path = env[name]["value"]
        mount = mount_for(container, path)
        assert mount is not None, f"{name}={path} is not mounted"
        assert mount["readOnly"] is True
        assert volumes[mount["name"]]["secret"]["secretName"] == secret
    auth = one(objects, "Secret", "o2u-scoring-auth")
    assert set(auth["data"]) == {"token"}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}}}, "not both"),
        ({"tls": {"enabled": True}}, "tls.secretName"),
        ({"tls": {"clientCA": {"enabled": True}}}, "needs tls.enabled"),
        ({"auth": {"enabled": True}}, "auth.existingSecret or auth.token"),
        (
            {"terminationGracePeriodSeconds": 20},
            "must exceed the server's drain, config.shutdown_grace_seconds (20) = 20 s",
        ),
        ({**REPLICAS, "rollingUpdate": {"maxSurge": 0, "maxUnavailable": "0%"}}, "cannot both be 0"),
        (
            {
                "terminationGracePeriodSeconds": 60,
                "config": {"shutdown_grace_seconds": 50, "webhook_timeout_seconds": 60},
                "webhooks": {"secret": {"existingSecret": "hooks"}},
                "database": {"url": "postgresql://o2u@db/o2u"},
            },
            "config.shutdown_grace_seconds (50) + config.webhook_timeout_seconds (60) + 5 s for the webhook "
            "sender + 5 s for the PostgreSQL notice listener = 120 s",
        ),
    ],
)
def test_inconsistent_values_fail_to_render(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        render_files(values)


def test_notes_tell_how_to_call_the_service() -> None:
    notes = render_files()["o2u/templates/NOTES.txt"]
    assert "kubectl -n o2u-test port-forward svc/o2u 50051:50051" in notes
    assert "grpcurl -plaintext localhost:50051 grpc.health.v1.Health/Check" in notes
    assert "WARNING" not in notes
    # The o2u command lines shown parse with the real CLI, with the flags TLS and tokens need.
    parser = build_parser()
    for values, flags in ((None, set()), (full_values(), {"--ca-cert", "--client-cert", "--token-file"})):
        text = render_files(values)["o2u/templates/NOTES.txt"]
        lines = [line.split() for line in text.splitlines() if line.strip().startswith("o2u --target")]
        assert {words[-1] for words in lines} >= {"health", "jobs"}
        for words in lines:
            parser.parse_args(words[1:])
            assert flags <= set(words)
    ephemeral = render_files({"persistence": {"enabled": False}})["o2u/templates/NOTES.txt"]
    assert "accepted jobs do not survive a restart" in ephemeral


def _quantity_bytes(quantity: str) -> int:
    units = {
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
        "k": 10**3,
        "M": 10**6,
        "G": 10**9,
        "T": 10**12,
    }
    match = re.fullmatch(r"([0-9]+)([A-Za-z]*)", quantity)
    assert match is not None, quantity
    return int(match[1]) * units[match[2]] if match[2] else int(match[1])


def test_shared_memory_holds_the_largest_decoded_dataset_by_default() -> None:
    """A job on several GPUs (the default on a node with more than one) moves its samples to
    /dev/shm: the default cap must admit every dataset the default limits accept."""
    objects = render()
    shm = pod_volumes(objects)["shm"]["emptyDir"]
    assert shm["medium"] == "Memory"
    configmap = one(objects, "ConfigMap", deployment(objects)["metadata"]["name"])
    max_decoded = yaml.safe_load(configmap["data"]["config.yaml"])["max_decoded_bytes"]
    assert _quantity_bytes(str(shm["sizeLimit"])) >= max_decoded
