"""What one job's reads report and obey: how much it has read, and whether it must stop.

A job's worker reads its dataset through a `Storage` bound to a `ReadMonitor`
(`Storage.for_job`). Every chunk of every file or object read passes through `add`, which counts
it, tells the job's progress callback and raises `Stopped` once the job is cancelled or the server
shuts down, so a worker never keeps reading a dataset nobody waits for. Several threads (the
image readers) may report at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

__all__ = ["ReadMonitor", "Stopped"]


class Stopped(Exception):
    """The job reading was asked to stop (cancelled, or the server is shutting down)."""


class ReadMonitor:
    """Counts a job's bytes and files read; `check` raises Stopped when `should_stop()` turns true."""

    def __init__(
        self,
        should_stop: Callable[[], bool] = lambda: False,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> None:
        self._should_stop = should_stop
        self._on_progress = on_progress
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.files_read = 0

    def check(self) -> None:
        if self._should_stop():
            raise Stopped("the job was asked to stop while reading its dataset")

    def add(self, size: int, *, files: int = 0) -> None:
        """`size` more bytes (and `files` more finished files) read; may raise Stopped."""
        with self._lock:
            self.bytes_read += size
            self.files_read += files
            figures = (self.bytes_read, self.files_read)
        if self._on_progress is not None:
            self._on_progress(*figures)
        self.check()
