"""The server's TLS files, read again when they change, and when their certificates expire.

A certificate in Kubernetes is renewed in place: cert-manager rewrites the Secret, and the kubelet
swaps the mounted files (a new `..data` folder behind the same symlinks) without restarting the pod.
A server that read its certificate only at start would serve the old one until it expired, and then
every replica would fail at once. `CertificateFiles` gives gRPC a certificate configuration fetcher
(`grpc.dynamic_ssl_server_credentials`): before each new connection's handshake it compares the
files' identity (device, inode, size and modification time, following symlinks) with what it last
loaded, and only when they changed reads and checks them as at start (`load`). A renewal that is
half written or invalid is logged and the certificate in use stays; the files are read again when
they change, or RETRY_SECONDS later.

`not_after` reads a PEM chain's expiry from its DER encoding (the validity field of RFC 5280's
TBSCertificate), so the `o2u_tls_certificate_expiry_timestamp_seconds` gauge needs no X.509 library.
"""

from __future__ import annotations

import calendar
import logging
import os
import re
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

__all__ = ["CertificateFiles", "TlsMaterial", "not_after"]

logger = logging.getLogger(__name__)

RETRY_SECONDS = 10.0  # after a failed reload, the files are read again this long after
_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)
_UTC_TIME, _GENERALIZED_TIME, _SEQUENCE, _CONTEXT_0 = 0x17, 0x18, 0x30, 0xA0


@dataclass(frozen=True)
class TlsMaterial:
    """The PEM bytes of one checked load of the TLS files."""

    private_key: bytes
    certificate_chain: bytes
    client_ca: bytes | None  # mutual TLS: the CA bundle callers' certificates must chain to

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.private_key, self.certificate_chain)], root_certificates=self.client_ca
        )


def _der_element(data: bytes, offset: int) -> tuple[int, int, int]:
    """(tag, start of the contents, end of the element) of the DER element at `offset`."""
    if offset + 2 > len(data):
        raise ValueError("truncated DER element")
    tag, length = data[offset], data[offset + 1]
    start = offset + 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 4 or start + count > len(data):
            raise ValueError("invalid DER length")
        length = int.from_bytes(data[start : start + count], "big")
        start += count
    if start + length > len(data):
        raise ValueError("truncated DER element")
    return tag, start, start + length


def _time(tag: int, text: bytes) -> float:
    """Seconds since the epoch of an ASN.1 UTCTime (YYMMDDHHMMSSZ, years 1950-2049) or
    GeneralizedTime (YYYYMMDDHHMMSSZ), as RFC 5280 encodes a validity."""
    value = text.decode("ascii")
    if tag == _UTC_TIME and re.fullmatch(r"\d{12}Z", value):
        year = int(value[:2])
        year += 1900 if year >= 50 else 2000
        rest = value[2:]
    elif tag == _GENERALIZED_TIME and re.fullmatch(r"\d{14}Z", value):
        year, rest = int(value[:4]), value[4:]
    else:
        raise ValueError(f"unsupported validity time {value!r}")
    month, day, hour, minute, second = (int(rest[i : i + 2]) for i in range(0, 10, 2))
    return float(calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0)))


def _certificate_not_after(der: bytes) -> float:
    tag, start, _ = _der_element(der, 0)  # Certificate
    if tag != _SEQUENCE:
        raise ValueError("not a DER certificate")
    tag, position, _ = _der_element(der, start)  # TBSCertificate
    if tag != _SEQUENCE:
        raise ValueError("not a DER certificate")
    tag, _, end = _der_element(der, position)
    if tag == _CONTEXT_0:  # the explicit version
        position = end
    for _field in ("serialNumber", "signature", "issuer"):
        _, _, position = _der_element(der, position)
    tag, validity, _ = _der_element(der, position)
    if tag != _SEQUENCE:
        raise ValueError("no validity in the certificate")
    _, _, after_not_before = _der_element(der, validity)
    tag, start, end = _der_element(der, after_not_before)
    return _time(tag, der[start:end])


def not_after(chain: bytes) -> float:
    """The earliest expiry (seconds since the epoch) of the certificates in a PEM chain: the chain
    stops working when its first certificate expires. ValueError when it holds none."""
    blocks = _PEM_CERTIFICATE.findall(chain)
    if not blocks:
        raise ValueError("no PEM certificate")
    return min(_certificate_not_after(ssl.PEM_cert_to_DER_cert(block.decode("ascii"))) for block in blocks)


def _identity(path: Path) -> tuple[int, int, int, int]:
    found = os.stat(path)  # follows the symlinks of a mounted Secret to the current file
    return found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns


class CertificateFiles:
    """The TLS files of the server, reloaded when they change; see the module docstring.

    `load` reads and checks the files (raising what it raises at start); `loaded` is told each
    certificate chain that goes into use, for the expiry gauge."""

    def __init__(
        self,
        paths: tuple[Path, ...],
        load: Callable[[], TlsMaterial],
        loaded: Callable[[bytes], None] = lambda chain: None,
    ) -> None:
        self._paths = paths
        self._load = load
        self._loaded = loaded
        self._lock = threading.Lock()
        self._seen = self._identities()
        self._retry_at: float | None = None  # after a failed load: when to read the same files again
        self.material = load()
        loaded(self.material.certificate_chain)

    def _identities(self) -> tuple[tuple[int, int, int, int], ...] | None:
        try:
            return tuple(_identity(path) for path in self._paths)
        except OSError:
            return None  # a file is missing mid-swap: look again at the next handshake

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's fetcher: a new configuration when the files changed and check out, else None
        (keep the current one). Called before every new connection's handshake."""
        with self._lock:
            identities = self._identities()
            retry = self._retry_at is not None and time.monotonic() >= self._retry_at
            if identities is None or (identities == self._seen and not retry):
                return None
            self._seen = identities
            try:
                material = self._load()
            except (ValueError, OSError) as error:  # SecurityConfigError names the setting
                # Read again in RETRY_SECONDS even if nothing changes: a file replaced between two
                # reads of one load (mid-swap) is whole by then; a bad renewal is logged again.
                self._retry_at = time.monotonic() + RETRY_SECONDS
                logger.error("the changed TLS files were not loaded; serving the previous ones: %s", error)
                return None
            self._retry_at = None
            self.material = material
        self._loaded(material.certificate_chain)
        logger.info("reloaded the TLS certificate and key after their files changed")
        return material.configuration()
