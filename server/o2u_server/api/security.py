"""Transport security and caller authentication for the gRPC server.

`server_credentials` turns the TLS settings into gRPC server credentials (TLS, or mutual TLS when a
client CA bundle is configured), checking every PEM file up front so a misconfigured deployment fails
at start with a message naming the setting and the file, not at the first handshake.
`read_token_file` reads and checks the single bearer token (auth_token_file); `_digest` and
`_rejection` are what `o2u_server.api.tenancy`'s interceptor compares tokens with and refuses calls
with, before their request is parsed. The health and reflection services stay open
(`EXEMPT_METHOD_PREFIXES`) so probes and tooling need no secret. Rejections go through the one error
mapping (`o2u_server.api.status`), so callers get UNAUTHENTICATED with a google.rpc.ErrorInfo like
every other error of the service.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, NoReturn

import grpc

from o2u_server.api.certificates import CertificateFiles, TlsMaterial
from o2u_server.api.status import grpc_status
from o2u_server.errors import Unauthenticated
from o2u_server.settings import Settings

__all__ = [
    "EXEMPT_METHOD_PREFIXES",
    "SecurityConfigError",
    "check_security_files",
    "read_token_file",
    "server_credentials",
]

logger = logging.getLogger(__name__)

# Methods any caller may reach without a token: Kubernetes probes and `grpcurl`-style tooling must work
# without the secret, and neither service reveals jobs, datasets or scores.
EXEMPT_METHOD_PREFIXES: tuple[str, ...] = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

_MAX_TOKEN_BYTES = 4096  # far above any real token; bounds what is hashed per call


class SecurityConfigError(ValueError):
    """A TLS or token setting points at a missing, unreadable or invalid file."""


# ---------------------------------------------------------------------------------------------------
# TLS
# ---------------------------------------------------------------------------------------------------


def _read_pem(path: Path, setting: str) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SecurityConfigError(f"{setting}: file {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise SecurityConfigError(f"{setting}: {str(path)!r} is a directory, expected a PEM file") from None
    except OSError as exc:
        raise SecurityConfigError(f"{setting}: cannot read {str(path)!r}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise SecurityConfigError(f"{setting}: {str(path)!r} is not PEM (no '-----BEGIN' line)")
    return data


def _refuse_encrypted_key() -> NoReturn:
    # gRPC cannot decrypt keys; without this callback OpenSSL would prompt on the terminal.
    raise SecurityConfigError(
        "O2U_TLS_KEY_FILE: the private key is encrypted; provide an unencrypted PEM key"
    )


def _check_pair(cert_file: Path, key_file: Path) -> None:
    """Let OpenSSL parse the certificate chain and key and confirm they belong together."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_file, key_file, password=_refuse_encrypted_key)
    except ssl.SSLError as exc:
        raise SecurityConfigError(
            f"O2U_TLS_CERT_FILE/O2U_TLS_KEY_FILE: {str(cert_file)!r} and {str(key_file)!r} are not a valid "
            f"certificate and matching private key: {exc.reason or exc}"
        ) from None


def _check_ca(ca_file: Path) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cafile=ca_file)
    except ssl.SSLError as exc:
        raise SecurityConfigError(
            f"O2U_TLS_CLIENT_CA_FILE: {str(ca_file)!r} holds no valid CA certificate: {exc.reason or exc}"
        ) from None


def _tls_material(cert_file: Path, key_file: Path, ca_file: Path | None) -> TlsMaterial:
    """The TLS files read and checked: SecurityConfigError names the setting of a bad one."""
    certificate_chain = _read_pem(cert_file, "O2U_TLS_CERT_FILE")
    private_key = _read_pem(key_file, "O2U_TLS_KEY_FILE")
    _check_pair(cert_file, key_file)
    client_ca: bytes | None = None
    if ca_file is not None:
        client_ca = _read_pem(ca_file, "O2U_TLS_CLIENT_CA_FILE")
        _check_ca(ca_file)
    # The checks open the files again: what they checked must be the bytes that are served.
    again = (
        _read_pem(cert_file, "O2U_TLS_CERT_FILE"),
        _read_pem(key_file, "O2U_TLS_KEY_FILE"),
        None if ca_file is None else _read_pem(ca_file, "O2U_TLS_CLIENT_CA_FILE"),
    )
    if again != (certificate_chain, private_key, client_ca):
        raise SecurityConfigError(
            "O2U_TLS_CERT_FILE/O2U_TLS_KEY_FILE: the files changed while they were read; reading them again"
        )
    return TlsMaterial(private_key, certificate_chain, client_ca)


def server_credentials(
    settings: Settings, *, certificate_loaded: Callable[[bytes], None] = lambda chain: None
) -> grpc.ServerCredentials | None:
    """gRPC server credentials from the TLS settings, or None for plaintext.

    TLS needs both tls_cert_file and tls_key_file; tls_client_ca_file additionally requires every
    client to present a certificate signed by that CA (mutual TLS). Raises SecurityConfigError naming
    the setting when a file is missing, unreadable, not PEM, or the key does not match the certificate.
    The files are read again when they change (a renewed certificate; `certificates.CertificateFiles`),
    and `certificate_loaded` is told each certificate chain that goes into use.
    """
    cert_file, key_file, ca_file = settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
    if cert_file is None and key_file is None:
        if ca_file is not None:
            raise SecurityConfigError(
                "O2U_TLS_CLIENT_CA_FILE is set but O2U_TLS_CERT_FILE/O2U_TLS_KEY_FILE are not: "
                "mutual TLS needs a server certificate"
            )
        return None
    if cert_file is None or key_file is None:
        missing = "O2U_TLS_CERT_FILE" if cert_file is None else "O2U_TLS_KEY_FILE"
        raise SecurityConfigError(
            f"TLS needs both O2U_TLS_CERT_FILE and O2U_TLS_KEY_FILE; {missing} is not set"
        )
    files = CertificateFiles(
        tuple(path for path in (cert_file, key_file, ca_file) if path is not None),
        lambda: _tls_material(cert_file, key_file, ca_file),
        certificate_loaded,
    )
    return grpc.dynamic_ssl_server_credentials(
        files.material.configuration(),
        files.fetch,  # type: ignore[arg-type]  # the stubs omit None, which gRPC documents as "no change"
        require_client_authentication=ca_file is not None,
    )


# ---------------------------------------------------------------------------------------------------
# Bearer tokens
# ---------------------------------------------------------------------------------------------------


def read_token_file(path: Path) -> str:
    """The token in a token file, surrounding whitespace (a trailing newline) removed.

    Raises SecurityConfigError if the file is missing, unreadable, empty, or holds characters that
    cannot travel in a gRPC metadata value (anything but visible ASCII).
    """
    setting = "O2U_AUTH_TOKEN_FILE"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SecurityConfigError(f"{setting}: file {str(path)!r} does not exist") from None
    except OSError as exc:
        raise SecurityConfigError(f"{setting}: cannot read {str(path)!r}: {exc.strerror or exc}") from None
    token = raw.strip()
    if not token:
        raise SecurityConfigError(f"{setting}: {str(path)!r} is empty; an empty token would admit anyone")
    if len(token) > _MAX_TOKEN_BYTES:
        raise SecurityConfigError(f"{setting}: the token is longer than {_MAX_TOKEN_BYTES} bytes")
    if not all(0x21 <= byte <= 0x7E for byte in token):
        raise SecurityConfigError(
            f"{setting}: the token may hold only visible ASCII characters (no spaces or control characters)"
        )
    return token.decode("ascii")


def _digest(token: str | bytes) -> bytes:
    # Comparing fixed-length digests keeps even the token's length out of the timing.
    data = token.encode("utf-8", "surrogateescape") if isinstance(token, str) else token
    return hashlib.sha256(data).digest()


def _rejection(reason: str, message: str) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler that ends the call with UNAUTHENTICATED without reading the request.

    A stream-stream handler serves every call shape on the wire, and never deserializing the
    request means an unauthenticated caller's payload is not even parsed.
    """
    status = grpc_status(Unauthenticated(message, reason=reason))

    async def reject(
        request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        await context.abort(status.code, status.details, status.trailing_metadata)

    return grpc.stream_stream_rpc_method_handler(reject)


def check_security_files(settings: Settings) -> None:
    """Read and check every TLS and token file now; SecurityConfigError names the first bad one.

    The entry point calls this before anything starts, so a bad Secret fails the pod at once with
    a one-line reason instead of after the server has begun to come up.
    """
    server_credentials(settings)
    if settings.auth_token_file is not None:
        read_token_file(settings.auth_token_file)
