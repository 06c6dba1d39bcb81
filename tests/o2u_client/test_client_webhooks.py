"""`o2u score --webhook URL` and `Client.submit(webhook_url=...)` against a real server and a real
loopback receiver: the job carries the webhook, the receiver gets the signed event, and `o2u get`
shows each delivery attempt."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from o2u_client import Client
from o2u_client.cli import main
from tests.server_testing import RunningServer
from tests.webhook_receiver import SECRET, Receiver, verify

TINY_FLAGS = ["--model=mlp", "--seed=0", "--pretrain-epochs=2", "--cycle-length-epochs=2", "--num-cycles=1"]


def test_score_with_a_webhook_notifies_the_receiver(
    capsys: pytest.CaptureFixture[str],
    start_server: Callable[..., RunningServer],
    dataset_uri: str,
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    server = start_server(
        webhook_allowed_urls=[receiver.url],
        webhook_secret_file=secret,
        webhook_allow_http_loopback=True,
    )
    receiver.plan = [500]
    status = main(
        ["--target", server.address, "--json", "score", dataset_uri, *TINY_FLAGS, "--webhook", receiver.url]
    )
    out = capsys.readouterr().out
    assert status == 0
    job_id = json.loads(out.splitlines()[-1])["job"]["job_id"]
    with Client(server.address) as client:
        deadline = time.monotonic() + 30
        while len((job := client.get(job_id)).webhook_deliveries) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert job.webhook_url == receiver.url
    assert [(d.attempt, d.outcome, d.http_status, d.final) for d in job.webhook_deliveries] == [
        (1, "HTTP_ERROR", 500, False),
        (2, "DELIVERED", 200, True),
    ]
    headers, body = receiver.received[-1]
    assert verify(SECRET, headers["o2u-signature"], body)
    assert json.loads(body)["subject"] == job_id
    assert main(["--target", server.address, "get", job_id]) == 0
    shown = capsys.readouterr().out
    assert receiver.url in shown
    assert "attempt 1" in shown
    assert "http_error (HTTP 500)" in shown
    assert "delivered (HTTP 200)" in shown
