"""Page tokens and page sizes (AIP-158) without a server."""

from __future__ import annotations

import pytest

from o2u_server.errors import InvalidArgument
from o2u_server.jobs.paging import PagePosition, PageTokens, resolve_page_size

SECRET = b"s" * 32


def test_a_token_round_trips_under_its_binding() -> None:
    tokens = PageTokens(SECRET)
    binding = PageTokens.binding("scores", job_id="job-1", top_k=0)
    token = tokens.issue(binding, PagePosition(after=40, total=400))
    assert tokens.parse(token, binding) == PagePosition(after=40, total=400)
    assert tokens.parse("", binding) is None


def test_tokens_from_another_secret_or_binding_are_refused() -> None:
    binding = PageTokens.binding("scores", job_id="job-1", top_k=0)
    token = PageTokens(b"o" * 32).issue(binding, PagePosition(after=1, total=2))
    with pytest.raises(InvalidArgument) as foreign:
        PageTokens(SECRET).parse(token, binding)
    assert (foreign.value.reason, foreign.value.field) == ("INVALID_PAGE_TOKEN", "page_token")

    tokens = PageTokens(SECRET)
    token = tokens.issue(binding, PagePosition(after=1, total=2))
    with pytest.raises(InvalidArgument) as other:
        tokens.parse(token, PageTokens.binding("scores", job_id="job-1", top_k=5))
    assert other.value.reason == "PAGE_TOKEN_MISMATCH"
    body, mac = token.split(".")
    flipped = f"{body}.{'B' if mac[0] == 'A' else 'A'}{mac[1:]}"
    for broken in (token.replace(".", ""), flipped, "!!.!!", "." * 600):
        with pytest.raises(InvalidArgument):
            tokens.parse(broken, binding)


def test_page_sizes() -> None:
    assert resolve_page_size(0, default=100, maximum=1000) == 100
    assert resolve_page_size(7, default=100, maximum=1000) == 7
    assert resolve_page_size(5000, default=100, maximum=1000) == 1000
    with pytest.raises(InvalidArgument, match="page_size must be >= 0"):
        resolve_page_size(-1, default=100, maximum=1000)
