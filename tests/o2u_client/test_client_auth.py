"""Bearer tokens and TLS from the client's side: plain metadata on an insecure loopback channel,
call credentials over mutual TLS, token files re-read when they change, and the CLI options."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from o2u_client import Client, UnauthenticatedError
from o2u_client.channel import TokenSource
from o2u_client.cli import main
from tests.o2u_server.tls_material import make_pki
from tests.server_testing import RunningServer


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

    flags = ["--target", server.address, "--ca-cert", str(pki.ca_cert)]
    flags += ["--client-cert", str(pki.client_cert), "--client-key", str(pki.client_key)]
    assert main([*flags, "--token-file", str(token_file), "--json", "jobs"]) == 0
    assert main([*flags, "health"]) == 0
    assert main([*flags[:4], "--client-cert", str(pki.client_cert), "jobs"]) == 2  # key missing
    assert "client_cert and client_key must be given together" in capsys.readouterr().err
