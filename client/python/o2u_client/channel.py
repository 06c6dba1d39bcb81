"""Channel construction: TLS (optionally mutual), bearer-token credentials and channel options.

Calls are balanced over every address the target resolves to (`round_robin`): with
`dns:///o2u-headless.<namespace>.svc:50051`, the chart's headless Service, one record per ready
replica, each call goes to the next replica instead of all calls to the one a ClusterIP Service
picked for the connection. gRPC re-resolves the name when a replica goes away or arrives.

Over TLS the token travels as gRPC call credentials, which gRPC refuses to send in clear text;
on an insecure channel (a server on loopback, for local use) the client adds the same
`authorization: Bearer <token>` header as plain metadata instead. A token file is re-read when
it changes on disk, so rotated tokens (e.g. Kubernetes projected tokens) are picked up without
restarting the caller.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

__all__ = ["Credential", "TokenSource", "create_channel"]

# A PEM value given inline (bytes) or as a path to a file holding it.
Credential = str | os.PathLike[str] | bytes

# Scores pages and summaries of large datasets can exceed gRPC's 4 MiB default.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Balance calls over every resolved address; `options` may set another policy (e.g. pick_first).
LOAD_BALANCING_POLICY = "round_robin"


def _read_credential(value: Credential | None, name: str) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    try:
        return Path(value).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {name} file {os.fspath(value)!r}: {exc.strerror}") from exc


class TokenSource:
    """The bearer token to send: a fixed string or the contents of a file, re-read on change."""

    def __init__(self, token: str | None = None, token_file: str | os.PathLike[str] | None = None) -> None:
        if token is not None and token_file is not None:
            raise ValueError("give either token or token_file, not both")
        self._token = token.strip() if token is not None else None
        self._path = Path(token_file) if token_file is not None else None
        self._lock = threading.Lock()
        self._mtime: float | None = None
        if self._path is not None:
            self.token()  # fail at construction, not at the first call, if the file is unreadable

    @property
    def configured(self) -> bool:
        return self._token is not None or self._path is not None

    def token(self) -> str | None:
        if self._path is None:
            return self._token
        with self._lock:
            try:
                mtime = self._path.stat().st_mtime
                if mtime != self._mtime:
                    self._token = self._path.read_text().strip()
                    self._mtime = mtime
            except OSError as exc:
                raise ValueError(f"cannot read token file {str(self._path)!r}: {exc.strerror}") from exc
            return self._token

    def metadata(self) -> tuple[tuple[str, str], ...]:
        token = self.token()
        return (("authorization", f"Bearer {token}"),) if token else ()


class _BearerAuth(grpc.AuthMetadataPlugin):
    def __init__(self, source: TokenSource) -> None:
        self._source = source

    def __call__(self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback) -> None:
        try:
            callback(self._source.metadata(), None)
        except ValueError as exc:
            callback((), exc)


def create_channel(
    target: str,
    *,
    tls: bool = False,
    root_certificates: Credential | None = None,
    client_cert: Credential | None = None,
    client_key: Credential | None = None,
    server_name: str | None = None,
    token_source: TokenSource | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    """A channel to `target` (host:port, or a gRPC name such as `dns:///host:port`); TLS is used when
    asked for or when any certificate is given. Later `options` override the defaults."""
    if (client_cert is None) != (client_key is None):
        raise ValueError("client_cert and client_key must be given together (mutual TLS)")
    channel_options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.primary_user_agent", "o2u-python-client"),
        ("grpc.lb_policy_name", LOAD_BALANCING_POLICY),
    ]
    if server_name:
        channel_options.append(("grpc.ssl_target_name_override", server_name))
    channel_options.extend(options)
    if not (tls or root_certificates is not None or client_cert is not None):
        return grpc.insecure_channel(target, options=channel_options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read_credential(root_certificates, "root certificates"),
        private_key=_read_credential(client_key, "client key"),
        certificate_chain=_read_credential(client_cert, "client certificate"),
    )
    if token_source is not None and token_source.configured:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.metadata_call_credentials(_BearerAuth(token_source), name="o2u-bearer")
        )
    return grpc.secure_channel(target, credentials, options=channel_options)
