"""The chart's health checks work against a real server: the TLS, client-CA and token wiring the
chart renders is turned into server settings (paths under /etc/o2u mapped to a temporary folder
holding certificates made here), and the exact probe and `helm test` commands the chart renders
must report SERVING - and must fail when the client certificate is left out, so the check is real.
Without TLS, the health service names of the native gRPC probes answer SERVING."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from chart_rendering import NAMESPACE, RELEASE, container_env, container_port, one, render, server_container
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from o2u_server import healthcheck

if TYPE_CHECKING:
    from tests.server_testing import RunningServer

MOUNT_ROOT = "/etc/o2u/"
TLS_VALUES: dict[str, Any] = {
    "tls": {"enabled": True, "secretName": "o2u-tls", "clientCA": {"enabled": True}},
    "auth": {"enabled": True, "token": "s3cret-token"},
}


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def write_tls_secret(folder: Path, dns_name: str) -> None:
    """What a cert-manager Secret holds: ca.crt, and tls.crt/tls.key for `dns_name`, usable for
    both server and client authentication (docs/operations.md asks for that under mutual TLS)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("o2u test CA"))
        .issuer_name(_name("o2u test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(dns_name))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    folder.mkdir(parents=True)
    (folder / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (folder / "tls.crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (folder / "tls.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )


def local(path: str, root: Path) -> str:
    """Map a path inside the pod (/etc/o2u/...) to the temporary folder standing in for it."""
    return str(root / path.removeprefix(MOUNT_ROOT)) if path.startswith(MOUNT_ROOT) else path


def rewrite(command: list[str], root: Path, address: str) -> list[str]:
    arguments = [local(argument, root) for argument in command[1:]]
    arguments[arguments.index("--address") + 1] = address
    return arguments


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, Path]]:
    """A server configured from the chart's TLS/mTLS/token env, files mapped under a temp root."""
    from tests.server_testing import running_server, test_settings

    root = tmp_path_factory.mktemp("etc-o2u")
    write_tls_secret(root / "tls", f"{RELEASE}.{NAMESPACE}.svc")
    (root / "client-ca").mkdir()
    (root / "client-ca" / "ca.crt").write_bytes((root / "tls" / "ca.crt").read_bytes())
    (root / "auth").mkdir()
    (root / "auth" / "token").write_text(TLS_VALUES["auth"]["token"])
    env = container_env(server_container(render(TLS_VALUES)))
    files = {
        name.removeprefix("O2U_").lower(): local(env[name]["value"], root)
        for name in ("O2U_TLS_CERT_FILE", "O2U_TLS_KEY_FILE", "O2U_TLS_CLIENT_CA_FILE", "O2U_AUTH_TOKEN_FILE")
    }
    settings = test_settings(state_dir=tmp_path_factory.mktemp("state"), data_roots=[], **files)
    with running_server(settings) as running:
        yield running, root


def test_tls_probes_report_serving(tls_server: tuple[RunningServer, Path]) -> None:
    running, root = tls_server
    container = server_container(render(TLS_VALUES))
    assert container_port(container, "grpc") == 50051
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        arguments = rewrite(container[kind]["exec"]["command"], root, running.address)
        assert healthcheck.main(arguments) == 0, kind
        # Without the client certificate, mutual TLS refuses the check.
        without_cert = arguments[: arguments.index("--cert")]
        assert healthcheck.main(without_cert) == 1


def test_helm_test_pod_reports_serving(tls_server: tuple[RunningServer, Path]) -> None:
    running, root = tls_server
    pod = one(render(TLS_VALUES), "Pod")
    arguments = rewrite(pod["spec"]["containers"][0]["command"], root, running.address)
    assert healthcheck.main(arguments) == 0
    # The name the check expects must be the one in the certificate.
    wrong_name = list(arguments)
    wrong_name[wrong_name.index("--server-name") + 1] = "someone-else.example.com"
    assert healthcheck.main(wrong_name) == 1


def test_native_probe_services_report_serving(tmp_path: Path) -> None:
    from tests.server_testing import running_server, test_settings

    container = server_container(render())
    services = {container[kind]["grpc"].get("service", "") for kind in ("livenessProbe", "readinessProbe")}
    settings = test_settings(state_dir=tmp_path / "state", data_roots=[])
    with running_server(settings) as running, running.channel() as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in services:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError):
            stub.Check(health_pb2.HealthCheckRequest(service="o2u.v1.NoSuchService"), timeout=10)
