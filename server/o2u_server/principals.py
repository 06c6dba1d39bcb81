"""Who is calling: the principal a call acts for, and which jobs it may see.

A principal is a name: the one a token in the tokens file maps to, or the subject common name of
a mutual-TLS client certificate (`o2u_server.api.tenancy` resolves it for each call). It owns the
jobs it creates; admin principals see every job. A server without tokens or client certificates
serves one principal, DEFAULT_PRINCIPAL, which owns every job, so it behaves as a single-tenant
server. The principal of the running call travels in a context variable, set by the interceptor
and read by the job manager, so the servicer passes nothing extra.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

__all__ = [
    "DEFAULT_PRINCIPAL",
    "PRINCIPAL_NAME",
    "PRINCIPAL_RULE",
    "Principal",
    "acting_as",
    "current_principal",
]

DEFAULT_PRINCIPAL = "default"  # the single token's, and everyone's without authentication
PRINCIPAL_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9 ._@-]{0,126}[A-Za-z0-9._@-])?")
PRINCIPAL_RULE = "1-128 characters of A-Z, a-z, 0-9, '.', '_', '@', '-' and inner spaces"


@dataclass(frozen=True)
class Principal:
    name: str
    admin: bool = False

    def sees(self, owner: str) -> bool:
        """Whether this principal may see (and act on) a job of `owner`."""
        return self.admin or owner == self.name

    @property
    def owner_filter(self) -> str | None:
        """The owner to restrict listings to, None for an admin (every owner)."""
        return None if self.admin else self.name


_DEFAULT = Principal(DEFAULT_PRINCIPAL)
_current: ContextVar[Principal | None] = ContextVar("o2u_principal", default=None)


def current_principal() -> Principal:
    """The principal the running call acts for (DEFAULT_PRINCIPAL outside an authenticated call)."""
    return _current.get() or _DEFAULT


@contextmanager
def acting_as(principal: Principal) -> Iterator[None]:
    """Make `principal` the current one inside the block."""
    token = _current.set(principal)
    try:
        yield
    finally:
        _current.reset(token)
