"""The chart and the server agree: every O2U_ variable and config.yaml key the chart sets is a
field of o2u_server.settings.Settings, the rendered environment plus config file load as valid
settings, and the ports, probes, state directory and grace period line up with what the server
listens on and does."""

from __future__ import annotations

import ast
import inspect
import itertools
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart_rendering import (
    CHART_DIR,
    ROOT,
    Manifest,
    container_env,
    container_port,
    deployment,
    full_values,
    mount_for,
    of_kind,
    one,
    pod_volumes,
    render,
    server_container,
)

from o2u.v1 import scoring_pb2
from o2u_server.settings import Settings

CONFIG_PATH = "/etc/o2u/config/config.yaml"
# Settings the chart derives from other values (ports, volumes, secrets) instead of config.
CHART_MANAGED = {
    "listen_address",
    "metrics_address",
    "metrics_port",
    "state_dir",
    "s3_access_key",
    "s3_secret_key",
    "tls_cert_file",
    "tls_key_file",
    "tls_client_ca_file",
    "auth_token_file",
    "tokens_file",
    "admin_principals",
    "max_jobs_per_principal",
    "database_url",
    "database_password_file",
    "checkpoint_uri",
    "webhook_allowed_urls",
    "webhook_secret_file",
}
SCORING_SERVICE = scoring_pb2.DESCRIPTOR.services_by_name["ScoringService"].full_name


def chart_values() -> dict[str, Any]:
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    assert isinstance(values, dict)
    return values


def settings_from_render(
    objects: list[Manifest], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """Load Settings the way the server does in the pod: env vars plus the mounted config file."""
    configmap = one(objects, "ConfigMap", deployment(objects)["metadata"]["name"])
    config_file = tmp_path / "config.yaml"
    config_file.write_text(configmap["data"]["config.yaml"])
    for name in [n for n in os.environ if n.startswith("O2U_")]:
        monkeypatch.delenv(name)
    for name, entry in container_env(server_container(objects)).items():
        if not name.startswith("O2U_"):
            continue
        if name == "O2U_CONFIG_FILE":
            assert entry["value"] == CONFIG_PATH
            monkeypatch.setenv(name, str(config_file))
        elif "valueFrom" in entry:
            monkeypatch.setenv(name, f"value-of-{entry['valueFrom']['secretKeyRef']['key']}")
        else:
            monkeypatch.setenv(name, entry["value"])
    return Settings()


def test_every_setting_is_configurable_through_the_chart() -> None:
    fields = set(Settings.model_fields)
    assert fields >= CHART_MANAGED
    config_keys = set(chart_values()["config"])
    assert config_keys | CHART_MANAGED == fields
    assert not config_keys & CHART_MANAGED


def test_config_defaults_are_the_server_defaults() -> None:
    for name, value in chart_values()["config"].items():
        field = Settings.model_fields[name]
        default = field.get_default(call_default_factory=True)
        assert value == default, f"config.{name}: chart default {value!r}, server default {default!r}"


@pytest.mark.parametrize("full", [False, True])
def test_rendered_env_and_config_are_valid_settings(
    full: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = full_values() if full else {}
    objects = render(values)
    container = server_container(objects)
    for name in container_env(container):
        if name.startswith("O2U_") and name != "O2U_CONFIG_FILE":
            assert name.removeprefix("O2U_").lower() in Settings.model_fields, f"{name} is not a setting"
    settings = settings_from_render(objects, tmp_path, monkeypatch)

    # Ports: what the server binds == container ports == Service target ports == probes.
    grpc_port = int(settings.listen_address.rsplit(":", 1)[1])
    assert grpc_port == container_port(container, "grpc")
    assert settings.metrics_port == container_port(container, "metrics")
    assert settings.metrics_address == "0.0.0.0"
    services = {s["metadata"]["name"]: s for s in of_kind(objects, "Service")}
    fullname = deployment(objects)["metadata"]["name"]
    assert services[fullname]["spec"]["ports"][0]["port"] == grpc_port
    assert services[f"{fullname}-metrics"]["spec"]["ports"][0]["port"] == settings.metrics_port

    # State directory: on the state volume (a PVC unless persistence is off).
    state_mount = mount_for(container, str(settings.state_dir))
    assert state_mount is not None
    assert state_mount["mountPath"] == str(settings.state_dir)
    assert "persistentVolumeClaim" in pod_volumes(objects)[state_mount["name"]]

    # Config file: mounted from the ConfigMap the checksum annotation covers.
    config_mount = mount_for(container, CONFIG_PATH)
    assert config_mount is not None
    assert pod_volumes(objects)[config_mount["name"]]["configMap"]["name"] == fullname

    if full:
        config = values["config"]
        assert settings.s3_endpoint == config["s3_endpoint"]
        assert settings.max_concurrent_jobs == config["max_concurrent_jobs"]
        assert settings.max_dataset_bytes == config["max_dataset_bytes"]
        assert [str(p) for p in settings.data_roots] == config["data_roots"]
        assert settings.s3_access_key is not None
        assert settings.s3_secret_key is not None
        assert settings.tls_client_ca_file is not None
        assert settings.auth_token_file is not None
        for root in settings.data_roots:
            assert mount_for(container, str(root)) is not None, f"data root {root} is not mounted"


def test_s3_credentials_come_from_the_secret() -> None:
    objects = render(full_values())
    env = container_env(server_container(objects))
    secret = one(objects, "Secret", "o2u-scoring-s3")
    for name in ("O2U_S3_ACCESS_KEY", "O2U_S3_SECRET_KEY"):
        reference = env[name]["valueFrom"]["secretKeyRef"]
        assert reference["name"] == secret["metadata"]["name"]
        assert reference["key"] in secret["data"]
    existing = render({"s3Credentials": {"existingSecret": "minio-o2u"}})
    assert not of_kind(existing, "Secret")
    reference = container_env(server_container(existing))["O2U_S3_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]
    assert reference == {"name": "minio-o2u", "key": "access-key"}
    assert "O2U_S3_ACCESS_KEY" not in container_env(server_container(render()))


def test_probes_use_the_grpc_health_service() -> None:
    objects = render()
    container = server_container(objects)
    grpc_port = container_port(container, "grpc")
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = container[kind]
        assert probe["grpc"]["port"] == grpc_port
    # Readiness follows the scoring service, which the server sets NOT_SERVING while it drains.
    assert container["readinessProbe"]["grpc"]["service"] == SCORING_SERVICE
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120


def test_probes_under_tls_run_the_healthcheck_command() -> None:
    objects = render(full_values())
    container = server_container(objects)
    grpc_port = container_port(container, "grpc")
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        command = container[kind]["exec"]["command"]
        assert command[0] == "o2u-healthcheck"
        assert command[command.index("--address") + 1] == f"127.0.0.1:{grpc_port}"
        assert "--tls" in command
        service = command[command.index("--service") + 1] if "--service" in command else ""
        assert service == (SCORING_SERVICE if kind == "readinessProbe" else ""), kind
        for argument in command:
            if argument.startswith("/etc/o2u/"):
                assert mount_for(container, argument) is not None, f"{argument} is not mounted"


@pytest.mark.parametrize("full", [False, True])
def test_termination_grace_exceeds_the_drain_time(full: bool) -> None:
    values = full_values() if full else {}
    objects = render(values)
    grace = deployment(objects)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    drain = (values.get("config") or chart_values()["config"])["shutdown_grace_seconds"]
    assert grace > drain
    default_drain = Settings.model_fields["shutdown_grace_seconds"].default
    assert isinstance(default_drain, float)
    assert chart_values()["terminationGracePeriodSeconds"] > default_drain


def documented_settings() -> dict[str, list[str]]:
    """Rows of the configuration table in docs/operations.md, by setting name."""
    rows: dict[str, list[str]] = {}
    for line in (ROOT / "docs" / "operations.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[1].startswith("`O2U_"):
            rows[cells[0].strip("`")] = cells
    return rows


def setting_docstrings() -> dict[str, str]:
    """The docstring under each Settings field, as the source states it."""
    tree = ast.parse(Path(inspect.getfile(Settings)).read_text())
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Settings").body
    docs: dict[str, str] = {}
    for node, following in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def documented_default(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, list) and not value:
        return "empty"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        return f"`{int(value)}`"
    return f"`{value}`"


def test_operations_doc_lists_every_setting() -> None:
    rows = documented_settings()
    docs = setting_docstrings()
    assert set(rows) == set(Settings.model_fields), "docs/operations.md configuration table is out of date"
    for name, field in Settings.model_fields.items():
        _, env, default, helm_value, meaning = rows[name]
        assert env == f"`O2U_{name.upper()}`"
        assert default == documented_default(field.get_default(call_default_factory=True)), name
        assert meaning == docs[name], f"meaning of {name} differs from its docstring in settings.py"
        if name in CHART_MANAGED:
            assert not helm_value.startswith("`config."), name
        else:
            assert helm_value == f"`config.{name}`", name
