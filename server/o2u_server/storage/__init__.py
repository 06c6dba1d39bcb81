"""Storage: the one door through which the server reads datasets and writes exports.

`Storage` checks every URI (`storage.uris`), then reads either a file under the data roots
(`storage.localfiles`) or an object in the configured S3-compatible store (`storage.objectstore`,
bounded retries, then Unavailable). Exports are written only under the export locations
(`export_uris`) and never replace an existing file or object. Objects read by listing are kept in
a byte-bounded LRU cache keyed by (URI, ETag), so a dataset scored twice is downloaded once and a
changed object is never served stale. A job's worker reads through `for_job`, which counts every
chunk read and stops the read (`Stopped`) once the job is cancelled or the server shuts down
(`storage.reads`). Methods block and are safe to call from several worker threads.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BufferedReader
from pathlib import Path
from typing import BinaryIO

from o2u_server.errors import InvalidArgument, PermissionDenied
from o2u_server.settings import Settings
from o2u_server.storage import localfiles
from o2u_server.storage.objectstore import ObjectStore, RetryPolicy
from o2u_server.storage.reads import ReadMonitor, Stopped
from o2u_server.storage.uris import (
    ObjectReference,
    file_uri,
    parse_uri,
    resolve_roots,
    s3_uri,
    under_prefix,
)
from o2u_server.text import shown

__all__ = ["ObjectInfo", "ObjectReference", "ObjectStore", "ReadMonitor", "RetryPolicy", "Stopped", "Storage"]

MIB = 1024 * 1024


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object or file: its URI, size in bytes, ETag, key relative to the listed prefix,
    and the URI to name it by in messages (the caller's, not a resolved path; default `uri`)."""

    uri: str
    size: int
    etag: str
    relative_key: str = ""
    shown_as: str = ""

    @property
    def name(self) -> str:
        return self.shown_as or self.uri


class _ByteCache:
    """Least-recently-used cache of object bytes, bounded by their total size."""

    def __init__(self, capacity_bytes: int) -> None:
        self._capacity = capacity_bytes
        self._entries: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> bytes | None:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: tuple[str, str], value: bytes) -> None:
        if len(value) > self._capacity // 4:
            return  # one large object would flush everything else
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = value
            self._size += len(value)
            while self._size > self._capacity:
                _, evicted = self._entries.popitem(last=False)
                self._size -= len(evicted)


class Storage:
    """Checked access to `file://` paths under the data roots and `s3://` objects in the one store."""

    def __init__(
        self,
        settings: Settings,
        *,
        retry: RetryPolicy | None = None,
        cache_bytes: int = 256 * MIB,
        max_connections: int = 16,
    ) -> None:
        self.data_roots = resolve_roots(settings.data_roots)
        self.allowed_buckets = list(settings.s3_allowed_buckets)
        exports = [uri.partition("://") for uri in settings.export_uris]
        self.export_roots = resolve_roots([Path(rest) for scheme, _, rest in exports if scheme == "file"])
        self.export_prefixes = [rest.partition("/")[::2] for scheme, _, rest in exports if scheme == "s3"]
        self.reads = ReadMonitor()
        self._cache = _ByteCache(cache_bytes)
        self._store: ObjectStore | None = None
        if settings.s3_endpoint:
            self._store = ObjectStore(
                settings.s3_endpoint,
                access_key=settings.s3_access_key.get_secret_value() if settings.s3_access_key else None,
                secret_key=settings.s3_secret_key.get_secret_value() if settings.s3_secret_key else None,
                secure=settings.s3_secure,
                region=settings.s3_region,
                retry=retry or RetryPolicy(),
                max_connections=max_connections,
            )

    @property
    def object_store(self) -> ObjectStore | None:
        """The configured object store itself, for what the operator names in settings (checkpoints),
        which the data roots and bucket allow-list do not govern."""
        return self._store

    def parse(self, uri: str, *, field: str = "dataset.uri", allow_prefix: bool = False) -> ObjectReference:
        """Check `uri`: PermissionDenied outside the roots or allowed buckets, InvalidArgument if bad.

        `allow_prefix` accepts `s3://bucket` with no key (a whole bucket, for listings)."""
        reference = parse_uri(
            uri,
            field=field,
            data_roots=self.data_roots,
            allowed_buckets=self.allowed_buckets,
            allow_prefix=allow_prefix,
        )
        if reference.scheme == "s3":
            self._s3_configured(uri, field)
        return reference

    def for_job(
        self, should_stop: Callable[[], bool], on_progress: Callable[[int, int], None] | None = None
    ) -> Storage:
        """This storage, for one job's reads: counted, reported to `on_progress(bytes, files)`, and
        stopped with Stopped once `should_stop()` is true (cache and connections are shared)."""
        view = copy.copy(self)
        view.reads = ReadMonitor(should_stop, on_progress)
        return view

    def parse_export(self, uri: str, *, field: str = "destination_uri") -> ObjectReference:
        """Check an export destination: PermissionDenied unless it lies under an export location."""
        if not self.export_roots and not self.export_prefixes:
            raise PermissionDenied(
                f"{field}: this server has no export locations (O2U_EXPORT_URIS), so it writes no exports",
                reason="EXPORTS_DISABLED",
                field=field,
            )
        buckets = sorted({bucket for bucket, _ in self.export_prefixes})
        try:
            reference = parse_uri(uri, field=field, data_roots=self.export_roots, allowed_buckets=buckets)
        except PermissionDenied as error:
            if error.reason in ("PATH_OUTSIDE_DATA_ROOTS", "BUCKET_NOT_ALLOWED"):
                raise _outside_exports(uri, field) from error
            raise
        if reference.scheme == "s3":
            if not buckets:  # no s3 export location: an empty allow-list above allowed every bucket
                raise _outside_exports(uri, field)
            self._s3_configured(uri, field)
            if not any(
                reference.bucket == bucket and under_prefix(reference.key, prefix)
                for bucket, prefix in self.export_prefixes
            ):
                raise _outside_exports(uri, field)
        return reference

    def _s3_configured(self, uri: str, field: str) -> None:
        if self._store is None:
            raise InvalidArgument(
                f"{field} {shown(uri)!r}: this server has no object store configured (O2U_S3_ENDPOINT)",
                reason="S3_NOT_CONFIGURED",
                field=field,
            )

    def _s3(self, reference: ObjectReference) -> tuple[ObjectStore, str]:
        # parse() guarantees both for s3 references.
        assert self._store is not None
        assert reference.bucket is not None
        return self._store, reference.bucket

    # ---- reading ----------------------------------------------------------------------------

    def stat(self, uri: str, *, field: str = "dataset.uri") -> ObjectInfo:
        """Size and ETag of one object or file; NotFound if it does not exist."""
        reference = self.parse(uri, field=field)
        if reference.scheme == "file":
            size, etag = localfiles.stat_entry(reference.key, uri=uri, field=field)
        else:
            store, bucket = self._s3(reference)
            size, etag = store.stat(bucket, reference.key)
        return ObjectInfo(reference.uri, size, etag, shown_as=uri)

    def read_bytes(
        self, uri: str, *, field: str = "dataset.uri", max_bytes: int | None = None, shown_as: str = ""
    ) -> bytes:
        """The whole object or file; ResourceExhausted once more than `max_bytes` arrive. Messages
        name it `shown_as` (default `uri`)."""
        return bytes(self.read_buffer(uri, field=field, max_bytes=max_bytes, shown_as=shown_as))

    def read_buffer(
        self, uri: str, *, field: str = "dataset.uri", max_bytes: int | None = None, shown_as: str = ""
    ) -> bytearray:
        """Like read_bytes, into a writable buffer (NumPy arrays can view it without a copy)."""
        reference = self.parse(uri, field=field)
        if reference.scheme == "file":
            data = localfiles.read_file(
                reference.key,
                uri=shown_as or uri,
                roots=self.data_roots,
                field=field,
                max_bytes=max_bytes,
                on_chunk=self.reads.add,
            )
        else:
            store, bucket = self._s3(reference)
            data = store.read(bucket, reference.key, max_bytes=max_bytes, on_chunk=self.reads.add)
        self.reads.add(0, files=1)
        return data

    def read_object(self, info: ObjectInfo, *, field: str = "dataset.uri") -> tuple[bytes, bool]:
        """Bytes of a listed object, from the cache when its ETag was seen: (data, came_from_cache)."""
        if not info.uri.startswith("s3://") or not info.etag:
            return self.read_bytes(info.uri, field=field, shown_as=info.name), False
        key = (info.uri, info.etag)
        cached = self._cache.get(key)
        if cached is not None:
            self.reads.add(0, files=1)
            return cached, True
        data = self.read_bytes(info.uri, field=field, shown_as=info.name)
        self._cache.put(key, data)
        return data, False

    def open_local(self, uri: str, *, field: str = "dataset.uri") -> BufferedReader | None:
        """The regular file behind a `file://` URI, opened for reading (None for s3); a FIFO, device
        or socket is refused without waiting. The caller reads it and reports through `reads`."""
        reference = self.parse(uri, field=field)
        if reference.scheme != "file":
            return None
        return localfiles.open_regular(reference.key, uri=uri, roots=self.data_roots, field=field)

    def iter_objects(self, uri_prefix: str, *, field: str = "dataset.uri") -> Iterator[ObjectInfo]:
        """Objects under an s3 key prefix, or files below a folder, in key order, as they are listed."""
        reference = self.parse(uri_prefix, field=field, allow_prefix=True)
        if reference.scheme == "file":
            for path, relative, size, etag in localfiles.iter_files(
                reference.key, uri=uri_prefix, roots=self.data_roots, field=field, on_entry=self.reads.check
            ):
                yield ObjectInfo(file_uri(path), size, etag, relative, shown_as=_joined(uri_prefix, relative))
            return
        store, bucket = self._s3(reference)
        for name, size, etag in store.iter_objects(bucket, reference.key):
            self.reads.check()
            yield ObjectInfo(s3_uri(bucket, name), size, etag, name[len(reference.key) :])

    # ---- writing ----------------------------------------------------------------------------

    def create_export(
        self,
        uri: str,
        data: bytes | Callable[[BinaryIO], None],
        *,
        field: str = "destination_uri",
        content_type: str = "application/octet-stream",
    ) -> int:
        """Write a new file or object under an export location; AlreadyExists if the name is taken
        (nothing is ever replaced). The result appears complete or not at all. Returns its size.

        `data` is the bytes, or a function that writes them: into the new file's temporary twin
        for a `file://` destination, into an upload of one part at a time for an object (see
        `ObjectStore.create_streamed`); either way no more than a part is held in memory."""
        reference = self.parse_export(uri, field=field)
        if reference.scheme == "file":
            return localfiles.create_file(reference.key, data, uri=uri, roots=self.export_roots, field=field)
        store, bucket = self._s3(reference)
        if callable(data):
            return store.create_streamed(bucket, reference.key, data, content_type=content_type)
        store.create(bucket, reference.key, data, content_type=content_type)
        return len(data)


def _joined(folder_uri: str, relative: str) -> str:
    return folder_uri.rstrip("/") + "/" + relative


def _outside_exports(uri: str, field: str) -> PermissionDenied:
    return PermissionDenied(
        f"{field} {shown(uri)!r} is not under one of the server's export locations (O2U_EXPORT_URIS); "
        "ask the operator where exports may go",
        reason="EXPORT_NOT_ALLOWED",
        field=field,
    )
