"""Channel construction: TLS (optionally mutual), bearer-token credentials and channel options.

Calls are balanced over every address the target resolves to (`round_robin`): with
`dns:///o2u-headless.<namespace>.svc:50051`, the chart's headless Service, one record per ready
replica, each call goes to the next replica instead of all calls to the one a ClusterIP Service
picked for the connection. gRPC re-resolves the name when a replica goes away or arrives.

Over TLS the token travels as gRPC call credentials, which gRPC refuses to send in clear text;
on an insecure channel the client adds the same `authorization: Bearer <token>` header as plain
metadata instead, which `check_token_transport` allows only to a loopback target unless the caller
opts in (a network that already encrypts, such as a service mesh). A token file is re-read when
it changes on disk, so rotated tokens (e.g. Kubernetes projected tokens) are picked up without
restarting the caller.

Keepalive pings are on by default: a peer that vanished without a TCP reset (a crashed host, a
middlebox that dropped the flow) would otherwise leave a watch stream waiting forever. The server
accepts a client's pings every 20 s (`MIN_CLIENT_PING_INTERVAL_MS` in `o2u_server.app`) and closes
connections that ping more often (GOAWAY `too_many_pings`), so the default interval stays above it.
"""

from __future__ import annotations

import ipaddress
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

__all__ = ["Credential", "TokenSource", "check_token_transport", "create_channel", "is_loopback_target"]

# A PEM value given inline (bytes) or as a path to a file holding it.
Credential = str | os.PathLike[str] | bytes

# Scores pages and summaries of large datasets can exceed gRPC's 4 MiB default.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Balance calls over every resolved address; `options` may set another policy (e.g. pick_first).
LOAD_BALANCING_POLICY = "round_robin"
# Seconds between keepalive pings while calls are in flight, and how long an unanswered ping waits
# before the connection is closed (its calls fail UNAVAILABLE, and a watch reconnects).
KEEPALIVE_TIME = 30.0
KEEPALIVE_TIMEOUT = 20.0


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


def _host(host_port: str) -> str:
    if host_port.startswith("["):
        return host_port[1:].partition("]")[0]
    if host_port.count(":") > 1:  # a bare IPv6 address
        return host_port
    return host_port.partition(":")[0]


def _loopback_host(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback_target(target: str) -> bool:
    """Whether a gRPC target names this machine: `localhost`, a loopback address (`127.0.0.1:50051`,
    `[::1]:50051`, `dns:///localhost:50051`, `ipv4:127.0.0.1:50051`) or a unix socket. Names are not
    resolved: any other host counts as remote."""
    scheme, _, rest = target.partition(":")
    if scheme in ("unix", "unix-abstract"):
        return True
    if scheme in ("ipv4", "ipv6"):
        return bool(rest) and all(_loopback_host(_host(address)) for address in rest.split(","))
    if scheme == "dns":
        authority_and_name = rest[2:] if rest.startswith("//") else None
        name = authority_and_name.partition("/")[2] if authority_and_name is not None else rest
        return _loopback_host(_host(name))
    return _loopback_host(_host(target))


def check_token_transport(
    target: str,
    *,
    tls: bool,
    token_configured: bool,
    allowed: bool,
    opt_in: str = "allow_plaintext_token=True",
) -> None:
    """Refuse (ValueError) to send a bearer token in clear text to a target off this machine, unless
    the caller said the network is trusted (`opt_in` names how, in the message)."""
    if token_configured and not tls and not allowed and not is_loopback_target(target):
        raise ValueError(
            f"refusing to send the bearer token unencrypted to {target}, which is not a loopback address: "
            f"connect with TLS, or pass {opt_in} if the network already encrypts (e.g. a service mesh)"
        )


def create_channel(
    target: str,
    *,
    tls: bool = False,
    root_certificates: Credential | None = None,
    client_cert: Credential | None = None,
    client_key: Credential | None = None,
    server_name: str | None = None,
    token_source: TokenSource | None = None,
    keepalive_time: float | None = KEEPALIVE_TIME,
    keepalive_timeout: float = KEEPALIVE_TIMEOUT,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    """A channel to `target` (host:port, or a gRPC name such as `dns:///host:port`); TLS is used when
    asked for or when any certificate is given. `keepalive_time` None turns keepalive pings off.
    Later `options` override the defaults."""
    if (client_cert is None) != (client_key is None):
        raise ValueError("client_cert and client_key must be given together (mutual TLS)")
    secure = tls or root_certificates is not None or client_cert is not None
    if server_name and not secure:
        raise ValueError(
            f"server_name {server_name!r} is the name to verify the server's TLS certificate against, "
            "but the connection is not TLS: add tls=True (or root_certificates)"
        )
    channel_options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.primary_user_agent", "o2u-python-client"),
        ("grpc.lb_policy_name", LOAD_BALANCING_POLICY),
        *_keepalive_options(keepalive_time, keepalive_timeout),
    ]
    if server_name:
        channel_options.append(("grpc.ssl_target_name_override", server_name))
    channel_options.extend(options)
    if not secure:
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


def _keepalive_options(time: float | None, timeout: float) -> list[tuple[str, int]]:
    if time is None:
        return []
    if time <= 0 or timeout <= 0:
        raise ValueError(f"keepalive_time and keepalive_timeout must be positive, got {time} and {timeout}")
    timeout_ms = round(timeout * 1000)
    return [
        ("grpc.keepalive_time_ms", round(time * 1000)),
        # gRPC 1.85 waits for a ping's ack for ping_timeout_ms; keepalive_timeout_ms alone is not enough.
        ("grpc.keepalive_timeout_ms", timeout_ms),
        ("grpc.http2.ping_timeout_ms", timeout_ms),
        # A watch sends no data after its request; gRPC cores that count pings without data (older
        # ones stop at two) must not stop keepalive on it.
        ("grpc.http2.max_pings_without_data", 0),
    ]
