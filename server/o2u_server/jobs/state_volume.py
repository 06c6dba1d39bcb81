"""The state volume (job store and checkpoints) running out of room, seen from the job runner.

Below `min_free_state_bytes` free, a worker holds a job back before starting it; a store write that
finds the volume full (`StateStoreFull`) is retried every STATE_FULL_RETRY_SECONDS until it succeeds,
so a job that trained for hours keeps its results and the server carries on by itself once space is
freed. Only a server that is stopping gives up (the job then stays RUNNING in the store and resumes
on the next start).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import TypeVar

from o2u_server.errors import StateStoreFull
from o2u_server.settings import Settings

__all__ = ["STATE_FULL_RETRY_SECONDS", "StateVolume", "free_state_bytes"]

logger = logging.getLogger(__name__)
T = TypeVar("T")
STATE_FULL_RETRY_SECONDS = 2.0  # how often a write refused for a full state volume is retried


def free_state_bytes(settings: Settings) -> int:
    """Free bytes (for this unprivileged process) on the state_dir volume."""
    found = os.statvfs(settings.state_dir)
    return found.f_bavail * found.f_frsize


class StateVolume:
    """Waiting for room on the state volume, until `closing` is set."""

    def __init__(self, settings: Settings, closing: threading.Event) -> None:
        self._settings = settings
        self._closing = closing

    def wait_for_space(self, job_id: str) -> None:
        """Return once the volume has `min_free_state_bytes` free (or the server stops)."""
        warned = False
        while (
            not self._closing.is_set()
            and free_state_bytes(self._settings) < self._settings.min_free_state_bytes
        ):
            if not warned:
                logger.error("the state volume is full; the job waits for space", extra={"job_id": job_id})
                warned = True
            self._closing.wait(STATE_FULL_RETRY_SECONDS)

    def persist(self, write: Callable[[], T]) -> T:
        """`write()` (a store call), retried while the state volume is full."""
        while True:
            try:
                return write()
            except StateStoreFull:
                if self._closing.is_set():
                    raise
                logger.error("the state volume is full; retrying in %.0f s", STATE_FULL_RETRY_SECONDS)
                self._closing.wait(STATE_FULL_RETRY_SECONDS)
