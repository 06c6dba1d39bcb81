"""Certificates made at test time for the TLS and mutual-TLS tests.

`make_pki` writes a throwaway certificate authority, a server certificate for 127.0.0.1/localhost
and a client certificate it signed, plus a second, unrelated authority with its own client
certificate, so tests can present both trusted and untrusted material. Keys are P-256 (fast to make).
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_VALIDITY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class Pki:
    """Paths of the PEM files `make_pki` wrote."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_cert: Path
    other_client_cert: Path
    other_client_key: Path

    def read(self, name: str) -> bytes:
        path: Path = getattr(self, name)
        return path.read_bytes()


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(
    subject: str, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, valid_for: datetime.timedelta
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + valid_for)
    )


def _authority(
    common_name: str, valid_for: datetime.timedelta = DEFAULT_VALIDITY
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    certificate = (
        _builder(common_name, _name(common_name), key.public_key(), valid_for)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return certificate, key


def _leaf(
    common_name: str,
    authority: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    *,
    server: bool,
    valid_for: datetime.timedelta = DEFAULT_VALIDITY,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    ca_cert, ca_key = authority
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        _builder(common_name, ca_cert.subject, key.public_key(), valid_for)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if server:
        names: list[x509.GeneralName] = [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _write_cert(path: Path, certificate: x509.Certificate) -> Path:
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.write_bytes(pem)
    return path


def write_encrypted_key(path: Path) -> Path:
    """A password-protected private key (which the server must refuse with a clear message)."""
    pem = _key().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    path.write_bytes(pem)
    return path


def make_pki(directory: Path, *, valid_for: datetime.timedelta = DEFAULT_VALIDITY) -> Pki:
    """Write a CA, server and client certificates, and an unrelated CA with its client, to
    `directory`; the CA and the server certificate are valid for `valid_for` from now."""
    directory.mkdir(parents=True, exist_ok=True)
    authority = _authority("o2u test CA", valid_for)
    server_cert, server_key = _leaf("o2u server", authority, server=True, valid_for=valid_for)
    client_cert, client_key = _leaf("o2u client", authority, server=False)
    other = _authority("unrelated CA")
    other_client_cert, other_client_key = _leaf("stranger", other, server=False)
    return Pki(
        ca_cert=_write_cert(directory / "ca.pem", authority[0]),
        server_cert=_write_cert(directory / "server.pem", server_cert),
        server_key=_write_key(directory / "server-key.pem", server_key),
        client_cert=_write_cert(directory / "client.pem", client_cert),
        client_key=_write_key(directory / "client-key.pem", client_key),
        other_ca_cert=_write_cert(directory / "other-ca.pem", other[0]),
        other_client_cert=_write_cert(directory / "other-client.pem", other_client_cert),
        other_client_key=_write_key(directory / "other-client-key.pem", other_client_key),
    )


@dataclass(frozen=True)
class TenantPki:
    """A CA, a server certificate and one client certificate per common name (`make_tenant_pki`)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, tuple[Path, Path]]  # common name -> (certificate, key)


def make_tenant_pki(directory: Path, common_names: list[str]) -> TenantPki:
    """Write a CA, a server certificate and a client certificate for each common name."""
    directory.mkdir(parents=True, exist_ok=True)
    authority = _authority("o2u tenants CA")
    server_cert, server_key = _leaf("o2u server", authority, server=True)
    clients = {}
    for name in common_names:
        cert, key = _leaf(name, authority, server=False)
        clients[name] = (
            _write_cert(directory / f"{name}.pem", cert),
            _write_key(directory / f"{name}-key.pem", key),
        )
    return TenantPki(
        ca_cert=_write_cert(directory / "ca.pem", authority[0]),
        server_cert=_write_cert(directory / "server.pem", server_cert),
        server_key=_write_key(directory / "server-key.pem", server_key),
        clients=clients,
    )
