"""Opaque, tamper-evident page tokens (AIP-158) and page size rules.

A token is a small JSON position (the last rank or job row returned, plus the total computed on the
first page) signed with HMAC-SHA256 under a secret kept in the job store, so tokens stay valid across
restarts but a caller can neither forge a position nor reuse a token with a different job or filter:
the signature covers a digest of the request parameters the page depends on.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any

from o2u_server.errors import InvalidArgument

__all__ = ["PagePosition", "PageTokens", "resolve_page_size"]

_MAC_BYTES = 16


def resolve_page_size(page_size: int, *, default: int, maximum: int) -> int:
    """0 means the default, larger values are capped, negative values are rejected."""
    if page_size < 0:
        raise InvalidArgument(
            f"page_size must be >= 0 (0 means the default of {default}), got {page_size}",
            reason="INVALID_PAGE_SIZE",
            field="page_size",
        )
    if page_size == 0:
        return default
    return min(page_size, maximum)


@dataclass(frozen=True)
class PagePosition:
    after: int  # last rank (scores) or job row number (jobs) already returned
    total: int  # total matching items, computed once on the first page (-1 when not tracked)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class PageTokens:
    """Issues and checks page tokens for one kind of list under one secret."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the page token secret must have at least 16 bytes")
        self._secret = secret

    @staticmethod
    def binding(kind: str, **params: Any) -> str:
        """Digest of the request parameters a page depends on (everything except page_size)."""
        text = json.dumps({"kind": kind, **params}, sort_keys=True, default=repr)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._secret, body, hashlib.sha256).digest()[:_MAC_BYTES]

    def issue(self, binding: str, position: PagePosition) -> str:
        body = json.dumps(
            {"b": binding, "a": position.after, "t": position.total}, separators=(",", ":")
        ).encode()
        return f"{_b64(body)}.{_b64(self._mac(body))}"

    def parse(self, token: str, binding: str) -> PagePosition | None:
        """The position in `token` (None for an empty token, i.e. the first page).

        Raises InvalidArgument if the token was not issued by this server or belongs to another
        request (another job, filter or list).
        """
        if not token:
            return None
        invalid = InvalidArgument(
            "page_token is not a token this server issued; pass the next_page_token of the previous "
            "response unchanged, or an empty token for the first page",
            reason="INVALID_PAGE_TOKEN",
            field="page_token",
        )
        body_text, dot, mac_text = token.partition(".")
        if not dot or len(token) > 512:
            raise invalid
        try:
            body, mac = _unb64(body_text), _unb64(mac_text)
        except (binascii.Error, ValueError):
            raise invalid from None
        if not hmac.compare_digest(mac, self._mac(body)):
            raise invalid
        data = json.loads(body)
        if data["b"] != binding:
            raise InvalidArgument(
                "page_token belongs to a different request; keep job_id and the filters the same "
                "while paging (only page_size may change)",
                reason="PAGE_TOKEN_MISMATCH",
                field="page_token",
            )
        return PagePosition(after=int(data["a"]), total=int(data["t"]))
