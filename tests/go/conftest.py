"""Fixtures of the Go client tests: the loopback webhook receiver."""

from __future__ import annotations

from tests.webhook_receiver import receiver  # noqa: F401  (a fixture for the webhook test)
