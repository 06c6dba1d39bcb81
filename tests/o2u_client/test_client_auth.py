"""Bearer tokens and TLS from the client's side: plain metadata on an insecure loopback channel,
and no token unencrypted to another host unless asked for; call credentials over mutual TLS, token
files re-read when they change, the CLI options, a TLS server name only with TLS, and an admin's
listing of one tenant's jobs (`list(owner=...)`, `o2u jobs --owner`)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from o2u_client import Client, UnauthenticatedError
from o2u_client.channel import TokenSource, is_loopback_target
from o2u_client.cli import main
from tests.o2u_server.tls_material import make_pki
from tests.server_testing import TINY_CONFIG, RunningServer


def test_token_source_rereads_a_changed_file(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("first\n")
    source = TokenSource(token_file=token_file)
    assert source.metadata() == (("authorization", "Bearer first"),)
    token_file.write_text("second")
    stat = token_file.stat()
    os.utime(token_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert source.token() == "second"
    assert TokenSource().metadata() == ()
    with pytest.raises(ValueError, match="cannot read token file"):
        TokenSource(token_file=tmp_path / "missing")
    with pytest.raises(ValueError, match="either token or token_file"):
        TokenSource("a", token_file)


def test_bearer_token_on_an_insecure_channel(
    start_server: Callable[..., RunningServer], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("a-long-random-token\n")
    server = start_server(auth_token_file=token_file)
    with Client(server.address) as anonymous:
        assert anonymous.healthy(), "health stays reachable without a token, for probes"
        with pytest.raises(UnauthenticatedError) as missing:
            list(anonymous.list())
        assert missing.value.reason == "MISSING_CREDENTIALS"
        assert missing.value.exit_code == 11
    with Client(server.address, token="wrong") as wrong, pytest.raises(UnauthenticatedError) as invalid:
        list(wrong.list())
    assert invalid.value.reason == "INVALID_CREDENTIALS"
    with Client(server.address, token_file=token_file) as authenticated:
        assert list(authenticated.list()) == []

    assert main(["--target", server.address, "jobs"]) == 11
    assert "error: UNAUTHENTICATED: " in capsys.readouterr().err
    assert main(["--target", server.address, "--token-file", str(token_file), "--json", "jobs"]) == 0
    assert capsys.readouterr().out == ""


REMOTE_TARGETS = [
    "10.1.2.3:50051",
    "o2u.example.internal:50051",
    "dns:///o2u-headless.ml.svc:50051",
    "dns://8.8.8.8/o2u.example.internal:50051",
    "ipv4:127.0.0.1:50051,10.1.2.3:50051",
    "[2001:db8::1]:50051",
]
LOOPBACK_TARGETS = [
    "localhost:50051",
    "127.0.0.1:50051",
    "127.3.2.1:50051",
    "[::1]:50051",
    "dns:///localhost:50051",
    "dns:localhost:50051",
    "ipv4:127.0.0.1:50051",
    "ipv6:[::1]:50051",
    "unix:/run/o2u.sock",
]


def test_loopback_targets() -> None:
    assert [target for target in LOOPBACK_TARGETS if not is_loopback_target(target)] == []
    assert [target for target in REMOTE_TARGETS if is_loopback_target(target)] == []


def test_a_token_goes_unencrypted_only_to_loopback_or_when_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for target in REMOTE_TARGETS:
        with pytest.raises(ValueError, match=r"not a loopback address.*allow_plaintext_token=True"):
            Client(target, token="a-long-random-token")
    token_file = tmp_path / "token"
    token_file.write_text("a-long-random-token")
    with pytest.raises(ValueError, match="allow_plaintext_token"):
        Client("10.1.2.3:50051", token_file=token_file)
    for allowed in (
        {"tls": True},
        {"allow_plaintext_token": True},
    ):
        Client("10.1.2.3:50051", token="a-long-random-token", **allowed).close()
    Client("10.1.2.3:50051").close()  # no token, nothing to protect
    for target in LOOPBACK_TARGETS:
        Client(target, token="a-long-random-token").close()

    remote = ["--target", "10.1.2.3:50051", "--token-file", str(token_file), "--timeout", "0.5"]
    assert main([*remote, "health"]) == 2
    err = capsys.readouterr().err
    assert "--allow-plaintext-token" in err
    assert "a-long-random-token" not in err
    # Asked for: the call is made (and finds nothing there: not serving).
    assert main([*remote, "--allow-plaintext-token", "health"]) == 6


def test_a_server_name_needs_tls(capsys: pytest.CaptureFixture[str], free_port: int) -> None:
    with pytest.raises(ValueError, match=r"server_name 'o2u.internal' .* not TLS"):
        Client(f"127.0.0.1:{free_port}", server_name="o2u.internal")
    Client(f"127.0.0.1:{free_port}", server_name="o2u.internal", tls=True).close()
    assert main(["--target", f"127.0.0.1:{free_port}", "--server-name", "o2u.internal", "health"]) == 2
    assert "--server-name is the TLS server name to verify: it needs --tls" in capsys.readouterr().err


def test_mutual_tls_with_a_token_as_call_credentials(
    start_server: Callable[..., RunningServer], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pki = make_pki(tmp_path / "pki")
    token_file = tmp_path / "token"
    token_file.write_text("tls-token")
    tls: dict[str, Any] = {
        "root_certificates": pki.ca_cert,
        "client_cert": pki.client_cert,
        "client_key": pki.client_key,
    }
    server = start_server(
        tls_cert_file=pki.server_cert,
        tls_key_file=pki.server_key,
        tls_client_ca_file=pki.ca_cert,
        auth_token_file=token_file,
    )
    # Credentials given inline as bytes work like paths.
    inline: dict[str, Any] = {name: Path(path).read_bytes() for name, path in tls.items()}
    with Client(server.address, token="tls-token", **inline) as client:
        assert list(client.list()) == []
    with Client(server.address, **tls) as no_token, pytest.raises(UnauthenticatedError):
        list(no_token.list())
    with Client(server.address, root_certificates=pki.ca_cert, timeout=5.0, wait_for_ready=False) as no_cert:
        assert not no_cert.healthy(), "the server requires a client certificate"
    # The certificate names localhost: verified against that name, the address reaches it.
    with Client(server.address, token="tls-token", server_name="localhost", **tls) as named:
        assert list(named.list()) == []
    with Client(server.address, server_name="elsewhere", timeout=5.0, wait_for_ready=False, **tls) as other:
        assert not other.healthy(), "the certificate does not name the expected server"

    flags = ["--target", server.address, "--ca-cert", str(pki.ca_cert)]
    flags += ["--client-cert", str(pki.client_cert), "--client-key", str(pki.client_key)]
    assert main([*flags, "--token-file", str(token_file), "--json", "jobs"]) == 0
    assert main([*flags, "health"]) == 0
    assert main([*flags[:4], "--client-cert", str(pki.client_cert), "jobs"]) == 2  # key missing
    assert "client_cert and client_key must be given together" in capsys.readouterr().err


def test_an_admin_lists_one_principals_jobs(
    start_server: Callable[..., RunningServer],
    dataset_uri: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tokens = {"alice": "alice-token-0123456789", "bob": "bob-token-9876543210", "root": "root-token-5555"}
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("".join(f"{name}: {token}\n" for name, token in tokens.items()))
    server = start_server(tokens_file=tokens_file, admin_principals=["root"])
    clients = {name: Client(server.address, token=token) for name, token in tokens.items()}
    try:
        jobs = {
            name: clients[name].submit(dataset_uri, config=TINY_CONFIG).job_id for name in ("alice", "bob")
        }
        admin, alice = clients["root"], clients["alice"]
        assert {job.job_id for job in admin.list()} == set(jobs.values())
        assert [(job.job_id, job.owner) for job in admin.list(owner="alice")] == [(jobs["alice"], "alice")]
        assert [job.job_id for job in admin.job_page(owner="bob", page_size=1).jobs] == [jobs["bob"]]
        # Another caller lists only its own jobs, whatever owner it names.
        assert [job.job_id for job in alice.list(owner="bob")] == [jobs["alice"]]
        for job_id in jobs.values():
            admin.wait(job_id, timeout=300)
    finally:
        for client in clients.values():
            client.close()

    root_token = tmp_path / "root-token"
    root_token.write_text(tokens["root"])
    cli = ["--target", server.address, "--token-file", str(root_token), "--json", "jobs", "--owner", "bob"]
    assert main(cli) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(job["job_id"], job["owner"]) for job in listed] == [(jobs["bob"], "bob")]
    assert main([*cli[:-1], "no such principal!"]) == 5
    assert "owner must be a principal name" in capsys.readouterr().err
