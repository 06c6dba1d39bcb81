"""Completion webhooks against a real HTTP receiver on loopback: the signed CloudEvent of a
succeeded, failed and cancelled job, retries after 500s and timeouts, giving up, the allow-list
checked at submit, and a delivery that waits across a server restart."""

from __future__ import annotations

import json
import ssl
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest

from o2u.v1 import scoring_pb2 as pb
from o2u.v1 import scoring_pb2_grpc
from o2u_server.jobs import webhooks
from o2u_server.jobs.webhooks import PER_DESTINATION, destination
from o2u_server.main import main
from o2u_server.settings import Settings
from tests.o2u_server.tls_material import make_pki
from tests.server_testing import (
    SLOW_CONFIG,
    call_error,
    create_job,
    running_server,
    test_settings,
    wait_for_job,
)
from tests.webhook_receiver import SECRET, Receiver, serve_receiver, verify

Stub = scoring_pb2_grpc.ScoringServiceStub


def _settings(tmp_path: Path, data_root: Path, receiver: Receiver, **overrides: Any) -> Any:
    secret = tmp_path / "webhook-secret"
    secret.write_bytes(SECRET + b"\n")
    values: dict[str, Any] = {
        "webhook_allowed_urls": [f"{receiver.scheme}://127.0.0.1:{receiver.port}/hooks/"],
        "webhook_secret_file": secret,
        "webhook_allow_http_loopback": True,
        "webhook_timeout_seconds": 0.5,
        "webhook_retry_seconds": 0.1,
        **overrides,
    }
    return test_settings(state_dir=tmp_path / "state", data_roots=[data_root], **values)


def _wait_attempts(stub: Stub, job_id: str, count: int, timeout: float = 30) -> pb.ScoringJob:
    deadline = time.monotonic() + timeout
    while True:
        job = stub.GetScoringJob(pb.GetScoringJobRequest(job_id=job_id)).job
        if len(job.webhook_deliveries) >= count and job.webhook_deliveries[-1].final:
            return job
        assert time.monotonic() < deadline, f"{len(job.webhook_deliveries)} attempts so far"
        time.sleep(0.05)


def _webhook(receiver: Receiver) -> pb.WebhookTarget:
    return pb.WebhookTarget(url=receiver.url)


def test_a_succeeded_job_posts_a_signed_cloudevent(
    tmp_path: Path, data_root: Path, digits_uri: str, receiver: Receiver
) -> None:
    settings = _settings(tmp_path, data_root, receiver)
    with running_server(settings) as server, server.channel() as channel:
        stub = Stub(channel)
        created = create_job(stub, digits_uri, display_name="nightly", webhook=_webhook(receiver))
        assert created.webhook_url == receiver.url
        job = _wait_attempts(stub, created.job_id, 1)
        assert job.state == pb.JOB_STATE_SUCCEEDED
        [delivery] = job.webhook_deliveries
        assert (delivery.attempt, delivery.outcome, delivery.http_status) == (
            1,
            pb.WEBHOOK_OUTCOME_DELIVERED,
            200,
        )
        assert delivery.final
        assert delivery.time.seconds > 0
        assert 'o2u_webhook_deliveries_total{outcome="delivered"} 1.0' in server.scrape()
    [(headers, body)] = receiver.received
    assert headers["content-type"] == "application/cloudevents+json"
    assert verify(SECRET, headers["o2u-signature"], body)
    assert not verify(b"another secret", headers["o2u-signature"], body)
    assert not verify(SECRET, headers["o2u-signature"], body.replace(b"nightly", b"nightlx"))
    event = json.loads(body)
    assert event["specversion"] == "1.0"
    assert event["type"] == "io.o2u.scoring.job.succeeded"
    assert event["subject"] == job.job_id
    assert event["datacontenttype"] == "application/json"
    assert event["id"]
    assert event["source"]
    assert event["time"].endswith("Z")
    data = event["data"]
    assert (data["job_id"], data["state"], data["display_name"]) == (job.job_id, "SUCCEEDED", "nightly")
    assert data["summary"]["num_samples"] == 400
    assert data["summary"]["num_suspected"] > 0


def test_deliveries_are_retried_after_500s_and_timeouts_then_given_up(
    tmp_path: Path, data_root: Path, digits_uri: str, receiver: Receiver
) -> None:
    receiver.plan = [500, "hang", 200]
    settings = _settings(tmp_path, data_root, receiver)
    with running_server(settings) as server, server.channel() as channel:
        stub = Stub(channel)
        job = _wait_attempts(stub, create_job(stub, digits_uri, webhook=_webhook(receiver)).job_id, 3)
        outcomes = [(d.attempt, d.outcome, d.http_status, d.final) for d in job.webhook_deliveries]
        assert outcomes == [
            (1, pb.WEBHOOK_OUTCOME_HTTP_ERROR, 500, False),
            (2, pb.WEBHOOK_OUTCOME_TIMEOUT, 0, False),
            (3, pb.WEBHOOK_OUTCOME_DELIVERED, 200, True),
        ]
        # Every attempt carries the same event (one id), each freshly signed.
        ids = {json.loads(body)["id"] for _, body in receiver.received}
        assert len(ids) == 1
        assert len(receiver.received) == 3
        assert all(verify(SECRET, headers["o2u-signature"], body) for headers, body in receiver.received)
        # The receiver keeps failing: the delivery is given up after webhook_max_attempts.
        receiver.default = 503
    limited = _settings(tmp_path, data_root, receiver, webhook_max_attempts=2)
    with running_server(limited) as server, server.channel() as channel:
        stub = Stub(channel)
        failing = create_job(stub, digits_uri, webhook=_webhook(receiver))
        job = _wait_attempts(stub, failing.job_id, 2)
        assert job.state == pb.JOB_STATE_SUCCEEDED  # the result stands, whatever the receiver says
        assert [(d.outcome, d.final) for d in job.webhook_deliveries] == [
            (pb.WEBHOOK_OUTCOME_HTTP_ERROR, False),
            (pb.WEBHOOK_OUTCOME_HTTP_ERROR, True),
        ]
        text = server.scrape()
        assert 'o2u_webhook_deliveries_total{outcome="http_error"} 2.0' in text
        assert 'o2u_webhook_deliveries_total{outcome="network_error"} 0.0' in text


def test_a_receiver_that_answers_a_byte_at_a_time_times_out_at_the_attempt_deadline(
    tmp_path: Path, data_root: Path, digits_uri: str, receiver: Receiver
) -> None:
    """webhook_timeout_seconds bounds the whole attempt, not each read: a receiver trickling its
    answer (every read gets a byte in time) would otherwise hold the one deliverer thread, and with
    it every other job's webhooks, for as long as it trickles."""
    receiver.plan = ["drip", 200]
    settings = _settings(tmp_path, data_root, receiver)
    with running_server(settings) as server, server.channel() as channel:
        stub = Stub(channel)
        job = _wait_attempts(stub, create_job(stub, digits_uri, webhook=_webhook(receiver)).job_id, 2)
        outcomes = [(d.outcome, d.final) for d in job.webhook_deliveries]
        assert outcomes == [(pb.WEBHOOK_OUTCOME_TIMEOUT, False), (pb.WEBHOOK_OUTCOME_DELIVERED, True)]
        assert "no complete answer within 0.5 s" in job.webhook_deliveries[0].error


def test_a_slow_receiver_holds_one_sender_not_every_job_s_webhooks(
    tmp_path: Path, data_root: Path, digits_uri: str, receiver: Receiver
) -> None:
    """While one attempt waits on a receiver that takes its time, the next job's event goes out on
    another sender: it is delivered, and recorded, before the slow attempt ends."""
    receiver.plan = [("hang", 8.0), 200]
    settings = _settings(tmp_path, data_root, receiver, webhook_timeout_seconds=20.0)
    with running_server(settings) as server, server.channel() as channel:
        stub = Stub(channel)
        slow = create_job(stub, digits_uri, webhook=_webhook(receiver))
        deadline = time.monotonic() + 60
        while not receiver.received:  # the first event is at the receiver, which holds it
            assert time.monotonic() < deadline
            time.sleep(0.05)
        quick = create_job(stub, digits_uri, webhook=_webhook(receiver))
        second = _wait_attempts(stub, quick.job_id, 1)
        first = _wait_attempts(stub, slow.job_id, 1)
    assert [d.outcome for d in (*first.webhook_deliveries, *second.webhook_deliveries)] == [
        pb.WEBHOOK_OUTCOME_DELIVERED,
        pb.WEBHOOK_OUTCOME_DELIVERED,
    ]
    quick_time = second.webhook_deliveries[0].time.ToDatetime()
    assert quick_time < first.webhook_deliveries[0].time.ToDatetime()


def test_a_slow_receiver_holds_at_most_half_the_senders(
    tmp_path: Path, data_root: Path, receiver: Receiver
) -> None:
    """Four events for a receiver that takes its time would hold all four senders; at most
    PER_DESTINATION of them go to it at once, and another receiver's event, queued after them,
    goes out on a free sender while they wait."""
    (data_root / "broken.npz").write_bytes(b"this is not a zip archive")  # a job that fails at once
    broken = (data_root / "broken.npz").as_uri()
    receiver.default = ("hang", 6.0)
    with serve_receiver() as other:
        allowed = [f"http://127.0.0.1:{port}/hooks/" for port in (receiver.port, other.port)]
        settings = _settings(
            tmp_path, data_root, receiver, webhook_allowed_urls=allowed, webhook_timeout_seconds=20.0
        )
        with running_server(settings) as server, server.channel() as channel:
            stub = Stub(channel)
            slow = [
                create_job(stub, broken, webhook=_webhook(receiver)).job_id
                for _ in range(2 * PER_DESTINATION)
            ]
            deadline = time.monotonic() + 60
            while len(receiver.received) < PER_DESTINATION:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            quick = _wait_attempts(stub, create_job(stub, broken, webhook=_webhook(other)).job_id, 1)
            assert len(receiver.received) == PER_DESTINATION, "the others wait for a slow one to end"
            first_slow = min(
                (_wait_attempts(stub, job_id, 1).webhook_deliveries[0] for job_id in slow),
                key=lambda attempt: attempt.time.ToDatetime(),
            )
    assert quick.webhook_deliveries[0].outcome == pb.WEBHOOK_OUTCOME_DELIVERED
    assert first_slow.outcome == pb.WEBHOOK_OUTCOME_DELIVERED
    assert quick.webhook_deliveries[0].time.ToDatetime() < first_slow.time.ToDatetime()
    assert len(receiver.received) == 2 * PER_DESTINATION


def test_a_destination_is_the_scheme_host_and_port_as_spelled() -> None:
    assert destination("https://Hooks.example:8443/o2u?x=1") == "https://Hooks.example:8443"
    assert destination("https://hooks.example?x=1") == "https://hooks.example"
    assert destination("https://hooks.example#top") == "https://hooks.example"
    assert destination("https://hooks.example") == "https://hooks.example"


def test_failed_and_cancelled_jobs_post_their_events(
    tmp_path: Path, data_root: Path, digits_uri: str, receiver: Receiver
) -> None:
    (data_root / "broken-hook.npz").write_bytes(b"this is not a zip archive")
    settings = _settings(tmp_path, data_root, receiver)
    with running_server(settings) as server, server.channel() as channel:
        stub = Stub(channel)
        broken = create_job(stub, (data_root / "broken-hook.npz").as_uri(), webhook=_webhook(receiver))
        failed = _wait_attempts(stub, broken.job_id, 1)
        assert failed.state == pb.JOB_STATE_FAILED
        slow = create_job(stub, digits_uri, config=SLOW_CONFIG, webhook=_webhook(receiver))
        stub.CancelScoringJob(pb.CancelScoringJobRequest(job_id=slow.job_id))
        cancelled = _wait_attempts(stub, slow.job_id, 1)
        assert cancelled.state == pb.JOB_STATE_CANCELLED
    events = {json.loads(body)["subject"]: json.loads(body) for _, body in receiver.received}
    assert events[failed.job_id]["type"] == "io.o2u.scoring.job.failed"
    assert events[failed.job_id]["data"]["state"] == "FAILED"
    assert events[failed.job_id]["data"]["error"]["reason"] == failed.error.reason
    assert events[cancelled.job_id]["type"] == "io.o2u.scoring.job.cancelled"
    assert "summary" not in events[cancelled.job_id]["data"]


def test_a_delivery_pending_at_a_restart_is_sent_after_it(
    tmp_path: Path, data_root: Path, digits_uri: str, receiver: Receiver
) -> None:
    receiver.default = 503  # the receiver is down while the job ends
    settings = _settings(tmp_path, data_root, receiver, webhook_retry_seconds=0.2)
    with running_server(settings) as server, server.channel() as channel:
        stub = Stub(channel)
        job = wait_for_job(stub, create_job(stub, digits_uri, webhook=_webhook(receiver)).job_id)
        deadline = time.monotonic() + 30
        while not stub.GetScoringJob(pb.GetScoringJobRequest(job_id=job.job_id)).job.webhook_deliveries:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    before = len(receiver.received)
    receiver.default = 200
    with running_server(settings) as server, server.channel() as channel:
        stub = Stub(channel)
        again = _wait_attempts(stub, job.job_id, before + 1)
        assert again.webhook_deliveries[-1].outcome == pb.WEBHOOK_OUTCOME_DELIVERED
        assert all(d.outcome == pb.WEBHOOK_OUTCOME_HTTP_ERROR for d in again.webhook_deliveries[:-1])
    assert json.loads(receiver.received[-1][1])["subject"] == job.job_id


def test_a_webhook_outside_the_allow_list_is_refused_at_submit(
    tmp_path: Path, data_root: Path, digits_uri: str, receiver: Receiver
) -> None:
    settings = _settings(tmp_path, data_root, receiver)
    with running_server(settings) as server, server.channel() as channel:
        stub = Stub(channel)
        for url, reason in [
            ("https://attacker.example.com/hooks/", "WEBHOOK_URL_NOT_ALLOWED"),
            (f"http://127.0.0.1:{receiver.port}/other", "WEBHOOK_URL_NOT_ALLOWED"),
            ("http://169.254.169.254/latest/meta-data/", "INVALID_WEBHOOK_URL"),
            ("ftp://127.0.0.1/hooks/", "INVALID_WEBHOOK_URL"),
            (f"http://user:pw@127.0.0.1:{receiver.port}/hooks/", "INVALID_WEBHOOK_URL"),
            (f"http://127.0.0.1:{receiver.port}/hooks/../admin", "INVALID_WEBHOOK_URL"),
            (f"http://127.0.0.1:{receiver.port}/hooks/%2e%2e/admin", "INVALID_WEBHOOK_URL"),
            (f"http://127.0.0.1:{receiver.port + 1}/hooks/", "WEBHOOK_URL_NOT_ALLOWED"),
            (f"http://127.0.0.1:{receiver.port}.evil.example/hooks/", "INVALID_WEBHOOK_URL"),
            ("", "INVALID_WEBHOOK_URL"),
        ]:
            target = pb.WebhookTarget(url=url)
            error = call_error(lambda target=target: create_job(stub, digits_uri, webhook=target))
            assert (error.code, error.reason, error.fields) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                reason,
                ["webhook.url"],
            ), url
        assert not stub.ListScoringJobs(pb.ListScoringJobsRequest()).jobs
    disabled = test_settings(state_dir=tmp_path / "other", data_roots=[data_root])
    with running_server(disabled) as server, server.channel() as channel:
        error = call_error(lambda: create_job(Stub(channel), digits_uri, webhook=_webhook(receiver)))
        assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "WEBHOOKS_DISABLED")
    assert not receiver.received


def test_a_host_name_entry_admits_its_default_port_or_the_one_it_names(
    tmp_path: Path, data_root: Path, digits_uri: str, receiver: Receiver
) -> None:
    """`localhost` admits only http's port 80 (no other port of the host), `127.0.0.1:<port>` any
    path on that one port: the server refuses the others at submit and delivers to that one."""
    allowed = ["localhost", f"127.0.0.1:{receiver.port}"]
    settings = _settings(tmp_path, data_root, receiver, webhook_allowed_urls=allowed)
    with running_server(settings) as server, server.channel() as channel:
        stub = Stub(channel)
        for url in (f"http://localhost:{receiver.port}/hooks/", f"http://127.0.0.1:{receiver.port + 1}/"):
            target = pb.WebhookTarget(url=url)
            error = call_error(lambda target=target: create_job(stub, digits_uri, webhook=target))
            assert (error.code, error.reason) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                "WEBHOOK_URL_NOT_ALLOWED",
            ), url
        job = create_job(
            stub, digits_uri, webhook=pb.WebhookTarget(url=f"http://127.0.0.1:{receiver.port}/any/path")
        )
        delivered = _wait_attempts(stub, job.job_id, 1)
        assert delivered.webhook_deliveries[-1].outcome == pb.WEBHOOK_OUTCOME_DELIVERED
    for url, port, admitted in [
        ("https://hooks.example/o2u", None, True),
        ("https://hooks.example:443/o2u", None, True),
        ("https://hooks.example:8443/o2u", None, False),
        ("https://hooks.example:8443/o2u", 8443, True),
        ("https://hooks.example/o2u", 8443, False),
        ("https://HOOKS.example:8443/", 8443, True),
        ("https://hooks.example.evil/", None, False),
    ]:
        entry = "Hooks.Example" if port is None else f"hooks.example:{port}"
        assert webhooks._allowed(url, urlsplit(url).hostname or "", [entry]) is admitted, (url, entry)


@pytest.mark.parametrize(
    "entry",
    [
        "hooks.example.com/o2u",
        "hooks.example.com:x",
        "ftp://hooks.example.com/",
        "user@hooks.example.com",
        "",
    ],
)
def test_an_allow_list_entry_that_is_no_prefix_or_host_is_refused_at_start(
    tmp_path: Path, entry: str
) -> None:
    with pytest.raises(ValueError, match="neither an https:// URL prefix nor a host name"):
        Settings(state_dir=tmp_path, webhook_allowed_urls=[entry, "hooks.example.com:8443"])


def test_o2u_server_refuses_to_start_without_a_usable_signing_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty-secret"
    empty.write_bytes(b"\n")
    monkeypatch.setenv("O2U_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("O2U_WEBHOOK_ALLOWED_URLS", "https://hooks.example.com/o2u/")
    for secret, expected in [
        (None, "needs webhook_secret_file"),
        (empty, "is empty"),
        (tmp_path / "none", ""),
    ]:
        if secret is None:
            monkeypatch.delenv("O2U_WEBHOOK_SECRET_FILE", raising=False)
        else:
            monkeypatch.setenv("O2U_WEBHOOK_SECRET_FILE", str(secret))
        assert main([]) == 2
        assert expected in capsys.readouterr().err


def test_https_receivers_must_present_a_trusted_certificate(
    tmp_path: Path, data_root: Path, digits_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pki = make_pki(tmp_path / "pki")
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(pki.server_cert, pki.server_key)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    with serve_receiver(tls) as receiver:
        settings = _settings(
            tmp_path, data_root, receiver, webhook_allow_http_loopback=False, webhook_max_attempts=1
        )
        assert settings.webhook_allowed_urls == [f"https://127.0.0.1:{receiver.port}/hooks/"]
        with running_server(settings) as server, server.channel() as channel:
            stub = Stub(channel)
            untrusted = _wait_attempts(
                stub, create_job(stub, digits_uri, webhook=_webhook(receiver)).job_id, 1
            )
            [attempt] = untrusted.webhook_deliveries
            assert (attempt.outcome, attempt.http_status) == (pb.WEBHOOK_OUTCOME_NETWORK_ERROR, 0)
            assert "SSL" in attempt.error
            assert not receiver.received
            # Trusting the test CA (OpenSSL reads SSL_CERT_FILE for its default roots) delivers.
            monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_cert))
            trusted = _wait_attempts(stub, create_job(stub, digits_uri, webhook=_webhook(receiver)).job_id, 1)
            assert trusted.webhook_deliveries[0].outcome == pb.WEBHOOK_OUTCOME_DELIVERED
        [(headers, body)] = receiver.received
        assert verify(SECRET, headers["o2u-signature"], body)


def test_a_url_removed_from_the_allow_list_is_not_sent_after_a_restart(
    tmp_path: Path, data_root: Path, digits_uri: str, receiver: Receiver
) -> None:
    receiver.default = 503
    settings = _settings(tmp_path, data_root, receiver, webhook_retry_seconds=0.2)
    with running_server(settings) as server, server.channel() as channel:
        stub = Stub(channel)
        job = _wait_attempts_started(stub, create_job(stub, digits_uri, webhook=_webhook(receiver)).job_id)
    sent = len(receiver.received)
    narrowed = _settings(tmp_path, data_root, receiver, webhook_allowed_urls=["https://elsewhere.example/"])
    with running_server(narrowed) as server, server.channel() as channel:
        stub = Stub(channel)
        again = _wait_attempts(stub, job, sent + 1)
        last = again.webhook_deliveries[-1]
        assert (last.outcome, last.http_status, last.final) == (pb.WEBHOOK_OUTCOME_NOT_ALLOWED, 0, True)
        assert 'o2u_webhook_deliveries_total{outcome="not_allowed"} 1.0' in server.scrape()
    assert len(receiver.received) == sent


def _wait_attempts_started(stub: Stub, job_id: str) -> str:
    deadline = time.monotonic() + 60
    while not stub.GetScoringJob(pb.GetScoringJobRequest(job_id=job_id)).job.webhook_deliveries:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return job_id
