"""Where training checkpoints live between a job's attempts: a local folder, or object storage that
every replica reads.

The engine writes its checkpoint to a local file (atomically: a temporary file, then a rename) and
knows nothing of object stores. With `O2U_CHECKPOINT_URI=s3://bucket/prefix` the runner stages that
file in the state directory: `prepare` downloads the newest checkpoint an earlier attempt of the job
uploaded, and `sync`, called after every epoch the engine reported (it writes its checkpoint before
it reports), uploads the file when it changed. Each attempt uploads under its own key
(`<prefix>/<job_id>/attempt-<n>.pt`; an S3 PUT replaces an object whole, never half), so a replica
that lost its lease can never overwrite the checkpoint of the attempt that took the job over; the
newest attempt's copy is what the next attempt resumes from. An attempt that lost its lease leaves
its copy while the job is open, as a crashed one does (`discard`). `delete` removes every copy when
the job ends. An object store that does not answer never fails a job: a checkpoint is a shortcut (a
resumed run and a fresh one score alike), so a failed upload is logged and tried again after the
next epoch, and a failed download (or one with no room to stage it) starts the attempt from the
beginning. Without a checkpoint URI (or with a local path) the engine writes straight into the
folder, which only one process uses.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from o2u_server.errors import NotFound, ServiceError
from o2u_server.jobs.claims import Lease
from o2u_server.settings import Settings
from o2u_server.storage import ObjectStore

__all__ = ["CheckpointStore", "LocalCheckpoints", "ObjectCheckpoints", "checkpoint_store"]

logger = logging.getLogger(__name__)

_ATTEMPT = re.compile(r"attempt-(\d+)\.pt$")


class CheckpointStore(Protocol):
    """What the runner and the manager use; see LocalCheckpoints for each method."""

    shared: bool  # every replica reads it
    directory: Path  # the local folder the engine writes to (part of the state volume)

    def path(self, job_id: str) -> Path: ...
    def open(self) -> None: ...
    def prepare(self, lease: Lease) -> Path: ...
    def sync(self, lease: Lease) -> None: ...
    def discard(self, lease: Lease, *, resumes: bool) -> None: ...
    def delete(self, job_id: str) -> None: ...
    def sweep(self, is_open: Callable[[str], bool]) -> int: ...


class LocalCheckpoints:
    """`<directory>/<job_id>.pt`, written in place by the engine; for one process."""

    def __init__(self, directory: Path) -> None:
        self.shared = False
        self.directory = directory

    def path(self, job_id: str) -> Path:
        return self.directory / f"{job_id}.pt"

    def open(self) -> None:
        """Remove what a crash left half-written; no worker runs yet. Complete checkpoints stay."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for leftover in self.directory.glob("*.tmp"):
            leftover.unlink(missing_ok=True)

    def prepare(self, lease: Lease) -> Path:
        """The file the engine resumes from and checkpoints to, for this attempt."""
        return self.path(lease.job_id)

    def sync(self, lease: Lease) -> None:
        """Make the checkpoint the engine last wrote readable by the job's next attempt."""

    def discard(self, lease: Lease, *, resumes: bool) -> None:
        """The attempt lost its lease. While the job `resumes` (it is still queued or running), what
        the attempt saved stays for the next attempt, as a crashed attempt's does: any checkpoint
        of the job is a valid place to go on from. Otherwise (it ended meanwhile) it goes. Here the
        file is the next attempt's too, and the job's end removes it."""

    def delete(self, job_id: str) -> None:
        """The job ended: remove its checkpoint and staged initial weights."""
        for path in (self.path(job_id), self.path(job_id).with_suffix(".init.pt")):
            path.unlink(missing_ok=True)

    def sweep(self, is_open: Callable[[str], bool]) -> int:
        """At start, before any worker runs: delete the checkpoints of every job holding some that
        `is_open(job_id)` says has ended or is gone - a crash between a job's final state and its
        `delete` leaves them. Returns how many jobs' checkpoints went."""
        ended = {job_id for job_id in self._jobs_with_checkpoints() if not is_open(job_id)}
        for job_id in ended:
            self.delete(job_id)
        return len(ended)

    def _jobs_with_checkpoints(self) -> set[str]:
        return {path.name.removesuffix(".pt").removesuffix(".init") for path in self.directory.glob("*.pt")}


class ObjectCheckpoints(LocalCheckpoints):
    """Checkpoints under `s3://<bucket>/<prefix>`, staged in `directory`; shared by every replica."""

    def __init__(self, directory: Path, objects: ObjectStore, bucket: str, prefix: str) -> None:
        super().__init__(directory)
        self.shared = True
        self._objects, self.bucket = objects, bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self._uploaded: dict[Lease, tuple[int, int]] = {}  # (mtime_ns, size) of the last upload

    def _key(self, lease: Lease) -> str:
        return f"{self.prefix}{lease.job_id}/attempt-{lease.attempt:06d}.pt"

    def _signature(self, path: Path) -> tuple[int, int] | None:
        try:
            status = path.stat()
        except FileNotFoundError:
            return None
        return status.st_mtime_ns, status.st_size

    def open(self) -> None:
        """Every staged file is a copy of an object (or a half-written one); no worker runs yet."""
        super().open()
        for staged in self.directory.glob("*.pt"):
            staged.unlink(missing_ok=True)

    def prepare(self, lease: Lease) -> Path:
        path = self.path(lease.job_id)
        path.unlink(missing_ok=True)
        try:
            self._download_newest(lease, path)
        except (ServiceError, OSError) as error:  # OSError: no room to stage it (a full state volume)
            logger.warning(
                "could not read the job's checkpoints; the attempt starts from the beginning: %s",
                error,
                extra={"job_id": lease.job_id},
            )
        signature = self._signature(path)
        if signature is not None:
            self._uploaded[lease] = signature  # no need to upload the copy again
        return path

    def _download_newest(self, lease: Lease, path: Path) -> None:
        earlier = sorted(
            (
                (int(found.group(1)), name)
                for name, _, _ in self._objects.iter_objects(self.bucket, f"{self.prefix}{lease.job_id}/")
                if (found := _ATTEMPT.search(name)) and int(found.group(1)) < lease.attempt
            ),
            reverse=True,
        )
        for _, name in earlier:
            try:
                data = self._objects.read(self.bucket, name, max_bytes=None)
            except NotFound:  # removed since it was listed: the job ended
                continue
            handle, temporary = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=self.directory)
            try:
                with os.fdopen(handle, "wb") as stream:
                    stream.write(data)
                os.replace(temporary, path)
            finally:
                Path(temporary).unlink(missing_ok=True)  # left only when the write failed
            return

    def sync(self, lease: Lease) -> None:
        path = self.path(lease.job_id)
        signature = self._signature(path)
        if signature is None or self._uploaded.get(lease) == signature:
            return
        key = self._key(lease)
        try:
            self._objects.put(self.bucket, key, path.read_bytes(), content_type="application/octet-stream")
        except ServiceError as error:
            logger.warning("could not upload a checkpoint: %s", error.message, extra={"job_id": lease.job_id})
            return
        self._uploaded[lease] = signature

    def discard(self, lease: Lease, *, resumes: bool) -> None:
        self._uploaded.pop(lease, None)
        if not resumes:  # the job ended while this attempt went on; its delete may have run already
            self._quietly(lambda: self._objects.remove(self.bucket, self._key(lease)), lease.job_id)

    def delete(self, job_id: str) -> None:
        super().delete(job_id)
        for lease in list(self._uploaded):  # a copy taken at once: other workers' threads add to it
            if lease.job_id == job_id:
                self._uploaded.pop(lease, None)

        def remove_all() -> None:
            for name, _, _ in list(self._objects.iter_objects(self.bucket, f"{self.prefix}{job_id}/")):
                self._objects.remove(self.bucket, name)

        self._quietly(remove_all, job_id)

    def _jobs_with_checkpoints(self) -> set[str]:
        """The jobs with objects under the prefix (the staged files went at `open`); none when the
        object store does not answer, which leaves them to a later start's sweep."""
        try:
            return {
                name[len(self.prefix) :].split("/", 1)[0]
                for name, _, _ in self._objects.iter_objects(self.bucket, self.prefix)
                if _ATTEMPT.search(name)
            }
        except ServiceError as error:
            logger.warning("could not list the checkpoints to sweep: %s", error.message)
            return set()

    @staticmethod
    def _quietly(operation: Callable[[], None], job_id: str) -> None:
        try:
            operation()
        except ServiceError as error:  # left for the object store's lifecycle rules
            logger.warning("could not remove checkpoints: %s", error.message, extra={"job_id": job_id})


def checkpoint_store(settings: Settings, objects: ObjectStore | None) -> CheckpointStore:
    """The checkpoint store O2U_CHECKPOINT_URI names: `s3://bucket/prefix`, a local folder (a path or
    a file:// URI), or by default `<state_dir>/checkpoints`."""
    uri = settings.checkpoint_uri
    if uri is None:
        return LocalCheckpoints(settings.checkpoint_dir)
    parts = urlsplit(uri)
    if parts.scheme == "s3":
        if objects is None:
            raise ValueError(f"O2U_CHECKPOINT_URI {uri!r} needs an object store: set O2U_S3_ENDPOINT")
        if not parts.netloc:
            raise ValueError(f"O2U_CHECKPOINT_URI {uri!r} names no bucket: use s3://bucket/prefix")
        return ObjectCheckpoints(settings.checkpoint_dir, objects, parts.netloc, parts.path)
    if parts.scheme == "file":
        return LocalCheckpoints(Path(parts.path))
    if parts.scheme:
        raise ValueError(f"O2U_CHECKPOINT_URI {uri!r}: use s3://bucket/prefix or a local folder")
    return LocalCheckpoints(Path(uri))
