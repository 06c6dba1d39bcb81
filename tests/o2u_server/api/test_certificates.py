"""A renewed TLS certificate is served without a restart, as Kubernetes renews one: the mounted
Secret's files change behind the same symlinks (a new `..data` folder swapped in). A broken renewal
keeps the certificate in use. The expiry gauge follows the certificate in use, read from its DER."""

from __future__ import annotations

import datetime
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc

from o2u_server.api import certificates
from o2u_server.api.certificates import CertificateFiles, TlsMaterial, not_after
from o2u_server.api.security import server_credentials
from o2u_server.settings import Settings
from tests.o2u_server.api.test_security import serve
from tests.o2u_server.tls_material import Pki, make_pki
from tests.server_testing import running_server, test_settings

TIMEOUT = 10


def _certificate(not_valid_after: datetime.datetime) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "expiry")])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC))
        .not_valid_after(not_valid_after)
        .sign(key, hashes.SHA256())
    )


def _pem(*certificates: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


def test_not_after_reads_utc_and_generalized_times_and_takes_the_earliest_of_a_chain() -> None:
    soon = _certificate(datetime.datetime(2031, 3, 4, 5, 6, 7, tzinfo=datetime.UTC))  # UTCTime
    late = _certificate(datetime.datetime(2061, 8, 9, 10, 11, 12, tzinfo=datetime.UTC))  # GeneralizedTime
    assert not_after(_pem(soon)) == soon.not_valid_after_utc.timestamp()
    assert not_after(_pem(late)) == late.not_valid_after_utc.timestamp()
    assert not_after(_pem(late, soon)) == soon.not_valid_after_utc.timestamp()
    with pytest.raises(ValueError, match="no PEM certificate"):
        not_after(b"-----BEGIN PRIVATE KEY-----\n...")


@dataclass
class MountedSecret:
    """A folder laid out as the kubelet mounts a Secret: tls.crt and tls.key are symlinks into
    `..data`, itself a symlink to the current version's folder, swapped atomically on update."""

    folder: Path
    versions: int = 0

    def publish(self, certificate: Path, key: Path) -> None:
        self.versions += 1
        version = self.folder / f"..version-{self.versions}"
        version.mkdir()
        shutil.copy(certificate, version / "tls.crt")
        shutil.copy(key, version / "tls.key")
        swap = self.folder / "..data_tmp"
        swap.symlink_to(version.name)
        os.replace(swap, self.folder / "..data")
        for name in ("tls.crt", "tls.key"):
            if not (self.folder / name).is_symlink():
                (self.folder / name).symlink_to(f"..data/{name}")

    @property
    def certificate(self) -> Path:
        return self.folder / "tls.crt"

    @property
    def key(self) -> Path:
        return self.folder / "tls.key"


@pytest.fixture
def pkis(tmp_path: Path) -> tuple[Pki, Pki]:
    """Two unrelated authorities with a server certificate each, valid for 1 and 40 days."""
    return (
        make_pki(tmp_path / "first"),
        make_pki(tmp_path / "renewed", valid_for=datetime.timedelta(days=40)),
    )


@pytest.fixture
def secret(tmp_path: Path, pkis: tuple[Pki, Pki]) -> MountedSecret:
    mounted = MountedSecret(tmp_path / "tls")
    mounted.folder.mkdir()
    mounted.publish(pkis[0].server_cert, pkis[0].server_key)
    return mounted


def _reaches(port: int, trusted: Path) -> bool:
    """Whether a new connection that trusts only `trusted` completes a health check."""
    credentials = grpc.ssl_channel_credentials(root_certificates=trusted.read_bytes())
    options = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own, not a shared one
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options) as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        except grpc.RpcError as error:
            refused = error.code() == grpc.StatusCode.UNAVAILABLE  # the handshake failed
            if not refused:
                raise
            return False
    return True


@pytest.fixture
def loaded(secret: MountedSecret) -> Iterator[tuple[int, list[bytes]]]:
    chains: list[bytes] = []
    settings = Settings(tls_cert_file=secret.certificate, tls_key_file=secret.key)
    with serve(server_credentials(settings, certificate_loaded=chains.append), []) as port:
        yield port, chains


def test_a_renewed_certificate_is_served_to_new_connections_without_a_restart(
    secret: MountedSecret, pkis: tuple[Pki, Pki], loaded: tuple[int, list[bytes]]
) -> None:
    port, chains = loaded
    first, renewed = pkis
    assert _reaches(port, first.ca_cert)
    assert not _reaches(port, renewed.ca_cert)
    secret.publish(renewed.server_cert, renewed.server_key)
    assert _reaches(port, renewed.ca_cert)
    assert not _reaches(port, first.ca_cert)
    assert chains == [first.read("server_cert"), renewed.read("server_cert")]


def test_a_broken_renewal_keeps_the_certificate_in_use_until_a_good_one_arrives(
    secret: MountedSecret,
    pkis: tuple[Pki, Pki],
    loaded: tuple[int, list[bytes]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    port, chains = loaded
    first, renewed = pkis
    secret.publish(renewed.server_cert, first.server_key)  # the key of another certificate
    assert _reaches(port, first.ca_cert)
    assert "the changed TLS files were not loaded; serving the previous ones" in caplog.text
    assert "are not a valid certificate and matching private key" in caplog.text
    secret.publish(renewed.server_cert, renewed.server_key)
    assert _reaches(port, renewed.ca_cert)
    assert chains == [first.read("server_cert"), renewed.read("server_cert")]


def test_the_server_exports_the_expiry_of_the_certificate_it_serves(
    secret: MountedSecret, pkis: tuple[Pki, Pki], data_root: Path, tmp_path: Path
) -> None:
    first, renewed = pkis
    expiry = "o2u_tls_certificate_expiry_timestamp_seconds"
    settings = test_settings(
        state_dir=tmp_path / "state",
        data_roots=[data_root],
        tls_cert_file=secret.certificate,
        tls_key_file=secret.key,
    )
    with running_server(settings) as server:
        assert server.gauge(expiry) == not_after(first.read("server_cert"))
        secret.publish(renewed.server_cert, renewed.server_key)
        assert _reaches(server.port, renewed.ca_cert)
        assert server.gauge(expiry) == not_after(renewed.read("server_cert"))
        assert server.gauge(expiry) - time.time() > 39 * 86400


def test_a_plaintext_server_exports_no_expiry(data_root: Path, tmp_path: Path) -> None:
    with running_server(test_settings(state_dir=tmp_path / "state", data_roots=[data_root])) as server:
        assert "o2u_tls_certificate_expiry_timestamp_seconds" not in server.scrape()


def test_a_load_that_fails_mid_swap_is_tried_again_without_another_change(
    secret: MountedSecret, pkis: tuple[Pki, Pki], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file replaced between two reads of one load (an OSError, a changed file) leaves nothing
    that changes again; the files are read again RETRY_SECONDS later."""
    first, renewed = pkis
    outcomes: list[Exception | None] = [None, FileNotFoundError("tls.key: gone mid-swap"), None]
    chains: list[bytes] = []

    def load() -> TlsMaterial:
        failure = outcomes.pop(0)
        if failure is not None:
            raise failure
        return TlsMaterial(secret.key.read_bytes(), secret.certificate.read_bytes(), None)

    files = CertificateFiles((secret.certificate, secret.key), load, chains.append)
    secret.publish(renewed.server_cert, renewed.server_key)
    assert files.fetch() is None  # the failed load
    assert files.fetch() is None  # nothing changed, and the retry is not due
    monkeypatch.setattr(certificates, "RETRY_SECONDS", 0.0)
    files._retry_at = 0.0  # due now
    assert files.fetch() is not None
    assert chains == [first.read("server_cert"), renewed.read("server_cert")]
