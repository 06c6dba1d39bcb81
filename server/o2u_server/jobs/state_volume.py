"""The local state volume running out of room, seen from the manager and the job runner.

"State volume" means every local folder the server writes job state to: the state directory, the
SQLite store's folder (with SQLite), and the checkpoint folder (`checkpoint_uri` when local, or the
folder where s3:// checkpoints are staged). The fullest of them decides: below
`min_free_state_bytes` free, CreateScoringJob is refused (STATE_DISK_FULL) and a worker claims no
job (another replica with room may take it). A store write that finds its storage full
(`StateStoreFull`: the SQLite volume, or a PostgreSQL server out of disk, DATABASE_FULL) is retried
every STATE_FULL_RETRY_SECONDS until it succeeds, so a job that trained for hours keeps its results
and the server carries on by itself once space is freed. Only a server that is stopping gives up
(the job then stays RUNNING in the store: its lease runs out and the next claim resumes it).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from o2u_server.errors import StateStoreFull
from o2u_server.jobs.checkpoints import CheckpointStore
from o2u_server.jobs.database import Database
from o2u_server.settings import Settings

__all__ = ["STATE_FULL_RETRY_SECONDS", "StateVolume"]

logger = logging.getLogger(__name__)
T = TypeVar("T")
STATE_FULL_RETRY_SECONDS = 2.0  # how often a write refused for a full state volume is retried


def _free_bytes(folder: Path) -> int:
    """Free bytes (for this unprivileged process) on the volume of `folder` or its nearest parent."""
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    found = os.statvfs(folder)
    return found.f_bavail * found.f_frsize


class StateVolume:
    """The local folders of job state, which must keep `min_free_bytes` free."""

    def __init__(self, folders: Iterable[Path], min_free_bytes: int) -> None:
        self.folders = list(dict.fromkeys(folders))
        self.min_free_bytes = min_free_bytes

    @classmethod
    def of_server(cls, settings: Settings, database: Database, checkpoints: CheckpointStore) -> StateVolume:
        """The state directory, the SQLite store's folder (with SQLite) and the checkpoint folder."""
        folders = [settings.state_dir, checkpoints.directory]
        if not database.postgresql and database.url.database:
            folders.append(Path(database.url.database).parent)
        return cls(folders, settings.min_free_state_bytes)

    def free_bytes(self) -> int:
        """Free bytes on the fullest of the folders' volumes."""
        return min(_free_bytes(folder) for folder in self.folders)

    def has_room(self) -> bool:
        return self.min_free_bytes <= 0 or self.free_bytes() >= self.min_free_bytes

    def wait_for_space(self, closing: threading.Event) -> None:
        """Return once the volume has `min_free_bytes` free (or `closing` is set)."""
        warned = False
        while not closing.is_set() and not self.has_room():
            if not warned:
                logger.error("the state volume is full; no job is claimed until space is freed")
                warned = True
            closing.wait(STATE_FULL_RETRY_SECONDS)

    def persist(self, write: Callable[[], T], closing: threading.Event) -> T:
        """`write()` (a store call), retried while its storage is full, until `closing` is set."""
        while True:
            try:
                return write()
            except StateStoreFull as full:
                if closing.is_set():
                    raise
                logger.error("%s; retrying in %.0f s", full.message, STATE_FULL_RETRY_SECONDS)
                closing.wait(STATE_FULL_RETRY_SECONDS)
