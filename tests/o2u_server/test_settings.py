"""The server's settings as o2u-server reads them from its environment: an O2U_ variable that names
no setting stops it at start, naming the variable and the setting it is closest to; the variables
that may stand beside the settings (the config file's name, the CLI's, a Kubernetes Service's
links) do not."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from o2u_server.main import main
from o2u_server.settings import Settings


def test_a_misspelt_setting_in_the_environment_stops_the_server_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("O2U_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("O2U_MAX_QUEUED_JOB", "1000")
    monkeypatch.setenv("O2U_NOT_A_SETTING", "1")
    named = "O2U_MAX_QUEUED_JOB (did you mean O2U_MAX_QUEUED_JOBS?), O2U_NOT_A_SETTING name no setting"
    with pytest.raises(ValueError, match=re.escape(named)):  # before: both ignored, 100 queued jobs
        Settings()
    assert main([]) == 2
    assert "o2u-server: invalid settings: environment variables O2U_MAX_QUEUED_JOB" in capsys.readouterr().err
    assert not (tmp_path / "state").exists(), "refused before the server made its state"


def test_variables_beside_the_settings_are_not_taken_for_misspelt_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a shell running the CLI, or a pod beside Services named o2u and o2u-metrics, holds."""
    for name, value in {
        "O2U_TARGET": "localhost:50051",
        "O2U_TOKEN_FILE": "/run/secrets/token",
        "O2U_SERVICE_HOST": "10.0.0.7",
        "O2U_SERVICE_PORT_GRPC": "50051",
        "O2U_PORT": "tcp://10.0.0.7:50051",
        "O2U_PORT_50051_TCP_ADDR": "10.0.0.7",
        "O2U_METRICS_SERVICE_PORT": "9464",
        "O2U_METRICS_PORT_9464_TCP_PROTO": "tcp",
        "o2u_max_queued_jobs": "7",  # the environment's names are not case-sensitive
    }.items():
        monkeypatch.setenv(name, value)
    assert Settings(state_dir=tmp_path).max_queued_jobs == 7
