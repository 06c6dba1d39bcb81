"""The acceptance gate against a real server: the summary's label-accuracy interval, overall and
per class, agrees with the scores' noise probabilities; `o2u score --max-noise-rate` /
`--min-label-accuracy` prints the verdict and exits 0 or 20 (`--json`: one object)."""

from __future__ import annotations

import json

import pytest

from o2u_client import Client
from o2u_client.cli import main
from o2u_client.gate import EXIT_GATE_FAILED, gate_verdict
from tests.o2u_client.test_client_cli import TINY_FLAGS
from tests.server_testing import TINY_CONFIG, RunningServer


def test_summary_reports_label_accuracy_with_an_interval(server: RunningServer, dataset_uri: str) -> None:
    with Client(server.address) as client:
        job = client.wait(client.submit(dataset_uri, config=TINY_CONFIG).job_id, timeout=300)
        summary = client.summary(job.job_id)
        scores = list(client.scores(job.job_id))
    estimate = summary.label_accuracy
    assert estimate is not None
    probabilities = [s.noise_probability for s in scores]
    assert estimate.mean == pytest.approx(1 - sum(probabilities) / len(probabilities))
    assert estimate.lower <= estimate.mean <= estimate.upper
    assert estimate.upper - estimate.lower > 0
    assert (estimate.level, estimate.method, estimate.num_samples) == (0.95, "exact", len(scores))
    for c in summary.classes:
        assert c.label_accuracy is not None
        assert c.label_accuracy.num_samples == c.count
        own = [s.noise_probability for s in scores if s.given_label == c.label]
        assert c.label_accuracy.mean == pytest.approx(1 - sum(own) / len(own))
        assert c.label_accuracy.lower <= c.label_accuracy.mean <= c.label_accuracy.upper
    passing = gate_verdict(summary, min_label_accuracy=estimate.mean)
    assert passing.passed
    failing = gate_verdict(summary, max_noise_rate=(1 - estimate.mean) / 2)
    assert not failing.passed
    assert "noise rate" in failing.reasons[0]
    with pytest.raises(ValueError, match="max_noise_rate"):
        gate_verdict(summary, max_noise_rate=1.5)


def test_score_gate_exit_codes_and_json(
    capsys: pytest.CaptureFixture[str], server: RunningServer, dataset_uri: str
) -> None:
    base = ["--target", server.address, "score", dataset_uri, *TINY_FLAGS, "--top=0"]
    assert main([*base, "--max-noise-rate", "1"]) == 0
    out = capsys.readouterr().out
    assert "gate PASSED: label accuracy" in out
    assert "95% interval" in out

    assert main(["--json", *base, "--min-label-accuracy", "0.9999", "--max-noise-rate", "0.0001"]) == 20
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["passed"] is False
    assert verdict["job_id"].startswith("job-")
    assert verdict["lower"] <= verdict["label_accuracy"] <= verdict["upper"]
    assert len(verdict["reasons"]) == 2
    assert len(verdict["classes"]) == 10
    assert EXIT_GATE_FAILED == 20

    assert main([*base, "--max-noise-rate", "0.0001"]) == EXIT_GATE_FAILED
    assert "gate FAILED" in capsys.readouterr().out
    assert main([*base, "--max-noise-rate", "2"]) == 2


def test_gate_with_no_wait_is_a_usage_error_and_submits_nothing(
    capsys: pytest.CaptureFixture[str], server: RunningServer, dataset_uri: str
) -> None:
    with Client(server.address) as client:
        before = len(list(client.list()))
    base = ["--target", server.address, "score", dataset_uri, *TINY_FLAGS, "--no-wait"]
    for gate in (["--max-noise-rate", "0.1"], ["--min-label-accuracy", "0.9"]):
        assert main([*base, *gate]) == 2
        assert (
            "the gate (--max-noise-rate / --min-label-accuracy) waits for the job" in capsys.readouterr().err
        )
    with Client(server.address) as client:
        assert len(list(client.list())) == before
