"""Tenants: which principal each call acts for, from its bearer token or its client certificate.

`read_tokens_file` reads the tokens file (tokens_file, O2U_TOKENS_FILE): one `principal: token` line
per tenant, `#` comments and blank lines ignored. `PrincipalInterceptor` resolves every call (but the
health and reflection services) to a `Principal` and runs the handler acting as it
(`o2u_server.principals`):
- with tokens (the tokens file, and the single auth_token_file, whose token maps to
  DEFAULT_PRINCIPAL), the call must carry `authorization: Bearer <token>`; the presented token is
  compared with every configured one in constant time, and the match names the principal;
- else, with mutual TLS (tls_client_ca_file), the subject common name of the verified client
  certificate names it.
Principals listed in admin_principals see every job. Tokens are never logged.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import grpc

from o2u_server.api.security import (
    _MAX_TOKEN_BYTES,
    EXEMPT_METHOD_PREFIXES,
    SecurityConfigError,
    _digest,
    _rejection,
    read_token_file,
)
from o2u_server.errors import Unauthenticated
from o2u_server.principals import DEFAULT_PRINCIPAL, PRINCIPAL_NAME, PRINCIPAL_RULE, Principal, acting_as
from o2u_server.settings import Settings

__all__ = ["PrincipalInterceptor", "principal_interceptors", "read_tokens_file"]

logger = logging.getLogger(__name__)

Handler = Any  # grpc.RpcMethodHandler; grpc-stubs types it for the synchronous server


def read_tokens_file(path: Path) -> dict[str, str]:
    """{token: principal} from a tokens file; SecurityConfigError names the bad line (never a token)."""
    setting = "O2U_TOKENS_FILE"
    try:
        text = path.read_text("ascii")
    except FileNotFoundError:
        raise SecurityConfigError(f"{setting}: file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SecurityConfigError(f"{setting}: cannot read {str(path)!r} as ASCII text: {exc}") from None
    tokens: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, token = (part.strip() for part in line.partition(":"))
        if not sep or not PRINCIPAL_NAME.fullmatch(name):
            raise SecurityConfigError(
                f"{setting}: line {number} is not 'principal: token' with a principal of {PRINCIPAL_RULE}"
            )
        if not token or not all(0x21 <= ord(c) <= 0x7E for c in token) or len(token) > 4096:
            raise SecurityConfigError(
                f"{setting}: line {number} (principal {name!r}) needs a token of 1-4096 visible ASCII "
                "characters"
            )
        if token in tokens:
            raise SecurityConfigError(f"{setting}: line {number} repeats the token of another line")
        tokens[token] = name
    if not tokens:
        raise SecurityConfigError(f"{setting}: {str(path)!r} holds no 'principal: token' line")
    return tokens


def _common_name(context: Any) -> str | None:
    """The subject CN of the call's verified client certificate, if any."""
    values = context.auth_context().get("x509_common_name") or []
    if len(values) != 1:
        return None
    name = values[0].decode("utf-8", "replace") if isinstance(values[0], bytes) else str(values[0])
    return name if PRINCIPAL_NAME.fullmatch(name) else None


class PrincipalInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Resolves each call's principal (by token, else by client certificate) and runs its handler
    acting as that principal; a call that names none is UNAUTHENTICATED."""

    def __init__(self, tokens: Mapping[str, str], *, mtls: bool, admins: frozenset[str]) -> None:
        self._tokens = [(_digest(token), name) for token, name in tokens.items()]
        self._mtls = mtls
        self._admins = admins
        self._missing = _rejection(
            "MISSING_CREDENTIALS", "this server requires an 'authorization: Bearer <token>' metadata entry"
        )
        self._invalid = _rejection("INVALID_CREDENTIALS", "the bearer token is not valid")

    def _by_token(self, metadata: Any) -> str | Handler:
        values = [value for key, value in (metadata or ()) if key == "authorization"]
        if len(values) != 1 or isinstance(values[0], bytes):
            return self._missing
        scheme, _, presented = values[0].strip().partition(" ")
        presented = presented.strip()
        if scheme.lower() != "bearer" or not presented:
            return self._missing
        digest = _digest(presented[: _MAX_TOKEN_BYTES + 1])  # longer ones cannot match: no need to hash them
        found: str | None = None
        for expected, name in self._tokens:  # every entry, so the time says nothing about which
            if hmac.compare_digest(digest, expected) and found is None:
                found = name
        return found if found is not None else self._invalid

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        method = handler_call_details.method or ""
        if method.startswith(EXEMPT_METHOD_PREFIXES):
            return await continuation(handler_call_details)
        name: str | None = None
        if self._tokens:
            found = self._by_token(handler_call_details.invocation_metadata)
            if not isinstance(found, str):
                logger.info("refused unauthenticated call", extra={"method": method})
                return found
            name = found
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return self._wrap(handler, name)

    def _principal(self, name: str | None, context: Any) -> Principal:
        if name is None and self._mtls:
            name = _common_name(context)
            if name is None:
                raise Unauthenticated(
                    "the client certificate names no principal: its subject needs one common name (CN) "
                    f"of {PRINCIPAL_RULE}",
                    reason="INVALID_CREDENTIALS",
                )
        name = name or DEFAULT_PRINCIPAL
        return Principal(name, admin=name in self._admins)

    def _wrap(self, handler: Handler, name: str | None) -> Handler:
        serializers = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def unary_unary(request: Any, context: Any) -> Any:
                with acting_as(self._principal(name, context)):
                    return await unary(request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, **serializers)
        if handler.unary_stream is not None:
            streaming = handler.unary_stream

            async def unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
                with acting_as(self._principal(name, context)):
                    async for response in streaming(request, context):
                        yield response

            return grpc.unary_stream_rpc_method_handler(unary_stream, **serializers)
        if handler.stream_stream is not None:
            bidirectional = handler.stream_stream

            async def stream_stream(requests: Any, context: Any) -> AsyncIterator[Any]:
                with acting_as(self._principal(name, context)):
                    async for response in bidirectional(requests, context):
                        yield response

            return grpc.stream_stream_rpc_method_handler(stream_stream, **serializers)
        raise TypeError("client-streaming methods are not served")  # this service has none


def principal_interceptors(settings: Settings) -> list[grpc.aio.ServerInterceptor[Any, Any]]:
    """The principal resolution the settings ask for: empty (everything DEFAULT_PRINCIPAL's) with no
    tokens and no client certificates."""
    tokens: dict[str, str] = {}
    if settings.tokens_file is not None:
        tokens = read_tokens_file(settings.tokens_file)
    if settings.auth_token_file is not None:
        single = read_token_file(settings.auth_token_file)
        if tokens.get(single, DEFAULT_PRINCIPAL) != DEFAULT_PRINCIPAL:
            raise SecurityConfigError("O2U_AUTH_TOKEN_FILE: its token is also a token of O2U_TOKENS_FILE")
        tokens[single] = DEFAULT_PRINCIPAL
    mtls = settings.tls_client_ca_file is not None
    if not tokens and not mtls:
        return []
    if tokens and settings.tls_cert_file is None:
        logger.warning("bearer tokens are configured without TLS: they cross the network in plaintext")
    return [PrincipalInterceptor(tokens, mtls=mtls, admins=frozenset(settings.admin_principals))]
