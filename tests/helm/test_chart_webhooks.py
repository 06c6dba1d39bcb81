"""The chart's completion webhook values: the allow-list and the signing key's Secret reach the
server as O2U_WEBHOOK_ALLOWED_URLS and a mounted O2U_WEBHOOK_SECRET_FILE, and the schema refuses an
allow-list without a signing key and entries that are neither https prefixes nor host names
(with an optional port)."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import pytest
from chart_rendering import container_env, deployment, loaded_chart, render, server_container

VALUES: dict[str, Any] = {
    "webhooks": {
        "allowedUrls": ["https://hooks.example.com/o2u/", "pipelines.example.com", "ci.example.com:8443"],
        "secret": {"existingSecret": "o2u-webhook-secret", "key": "hmac"},
    }
}


def test_webhook_values_reach_the_server() -> None:
    objects = render(VALUES)
    env = container_env(server_container(objects))
    assert env["O2U_WEBHOOK_ALLOWED_URLS"]["value"] == (
        "https://hooks.example.com/o2u/,pipelines.example.com,ci.example.com:8443"
    )
    assert env["O2U_WEBHOOK_SECRET_FILE"]["value"] == "/etc/o2u/webhooks/hmac"
    mounts = {m["name"]: m for m in server_container(objects)["volumeMounts"]}
    assert mounts["webhooks"]["mountPath"] == "/etc/o2u/webhooks"
    assert mounts["webhooks"]["readOnly"] is True
    volumes = {v["name"]: v for v in deployment(objects)["spec"]["template"]["spec"]["volumes"]}
    assert volumes["webhooks"]["secret"]["secretName"] == "o2u-webhook-secret"


def test_webhooks_are_off_by_default() -> None:
    env = container_env(server_container(render()))
    assert "O2U_WEBHOOK_ALLOWED_URLS" not in env
    assert "O2U_WEBHOOK_SECRET_FILE" not in env


@pytest.mark.parametrize(
    "webhooks",
    [
        {"allowedUrls": ["https://hooks.example.com/"]},  # no signing key
        {"allowedUrls": ["https://hooks.example.com/"], "secret": {"existingSecret": ""}},
        {"allowedUrls": ["http://hooks.example.com/"], "secret": {"existingSecret": "s"}},
        {"allowedUrls": ["https://user@hooks.example.com/"], "secret": {"existingSecret": "s"}},
        {"allowedUrls": ["hooks example"], "secret": {"existingSecret": "s"}},
        {"allowedUrls": ["hooks.example.com:https"], "secret": {"existingSecret": "s"}},
        {"allowedUrls": ["hooks.example.com:8443/o2u"], "secret": {"existingSecret": "s"}},
        {"allowed": []},
    ],
)
def test_the_schema_refuses_bad_webhook_values(webhooks: dict[str, Any]) -> None:
    with loaded_chart() as chart, pytest.raises(helm.HelmValuesError):
        chart.validate_schema({"webhooks": webhooks})
