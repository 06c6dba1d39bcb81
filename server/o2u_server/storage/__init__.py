"""Storage: the one door through which the server reads datasets and writes exports.

`Storage` checks every URI (`storage.uris`), then reads or writes either a file under the data roots
(`storage.localfiles`) or an object in the configured S3-compatible store (`storage.objectstore`,
bounded retries, then Unavailable). Objects read by listing are kept in a byte-bounded LRU cache
keyed by (URI, ETag), so a dataset scored twice is downloaded once and a changed object is never
served stale. Methods block and are safe to call from several worker threads.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from o2u_server.errors import InvalidArgument
from o2u_server.settings import Settings
from o2u_server.storage import localfiles
from o2u_server.storage.objectstore import ObjectStore, RetryPolicy
from o2u_server.storage.uris import ObjectReference, file_uri, parse_uri, resolve_roots, s3_uri

__all__ = ["ObjectInfo", "ObjectReference", "ObjectStore", "RetryPolicy", "Storage"]

MIB = 1024 * 1024


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object or file: its URI, size in bytes, ETag, and key relative to the listed prefix."""

    uri: str
    size: int
    etag: str
    relative_key: str = ""


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
        if reference.scheme == "s3" and self._store is None:
            raise InvalidArgument(
                f"{field} {uri!r}: this server has no object store configured (O2U_S3_ENDPOINT)",
                reason="S3_NOT_CONFIGURED",
                field=field,
            )
        return reference

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
            size, etag = localfiles.stat_entry(reference.key, field=field)
        else:
            store, bucket = self._s3(reference)
            size, etag = store.stat(bucket, reference.key)
        return ObjectInfo(reference.uri, size, etag)

    def read_bytes(self, uri: str, *, field: str = "dataset.uri", max_bytes: int | None = None) -> bytes:
        """The whole object or file; ResourceExhausted once more than `max_bytes` arrive."""
        return bytes(self.read_buffer(uri, field=field, max_bytes=max_bytes))

    def read_buffer(self, uri: str, *, field: str = "dataset.uri", max_bytes: int | None = None) -> bytearray:
        """Like read_bytes, into a writable buffer (NumPy arrays can view it without a copy)."""
        reference = self.parse(uri, field=field)
        if reference.scheme == "file":
            return localfiles.read_file(
                reference.key, roots=self.data_roots, field=field, max_bytes=max_bytes
            )
        store, bucket = self._s3(reference)
        return store.read(bucket, reference.key, max_bytes=max_bytes)

    def read_object(self, info: ObjectInfo, *, field: str = "dataset.uri") -> tuple[bytes, bool]:
        """Bytes of a listed object, from the cache when its ETag was seen: (data, came_from_cache)."""
        if not info.uri.startswith("s3://") or not info.etag:
            return self.read_bytes(info.uri, field=field), False
        key = (info.uri, info.etag)
        cached = self._cache.get(key)
        if cached is not None:
            return cached, True
        data = self.read_bytes(info.uri, field=field)
        self._cache.put(key, data)
        return data, False

    def open_local(self, uri: str, *, field: str = "dataset.uri") -> Path | None:
        """The resolved path of the regular file behind a `file://` URI (to memory-map); None for s3."""
        reference = self.parse(uri, field=field)
        if reference.scheme != "file":
            return None
        localfiles.regular_file(reference.key, field=field)
        return Path(reference.key)

    def iter_objects(self, uri_prefix: str, *, field: str = "dataset.uri") -> Iterator[ObjectInfo]:
        """Objects under an s3 key prefix, or files below a folder, in key order, as they are listed."""
        reference = self.parse(uri_prefix, field=field, allow_prefix=True)
        if reference.scheme == "file":
            for path, relative, size, etag in localfiles.iter_files(
                reference.key, roots=self.data_roots, field=field
            ):
                yield ObjectInfo(file_uri(path), size, etag, relative)
            return
        store, bucket = self._s3(reference)
        for name, size, etag in store.iter_objects(bucket, reference.key):
            yield ObjectInfo(s3_uri(bucket, name), size, etag, name[len(reference.key) :])

    # ---- writing ----------------------------------------------------------------------------

    def write_bytes(
        self,
        uri: str,
        data: bytes,
        *,
        field: str = "destination_uri",
        content_type: str = "application/octet-stream",
    ) -> int:
        """Write (replace) one object or file; files are replaced atomically. Returns the bytes written."""
        reference = self.parse(uri, field=field)
        if reference.scheme == "file":
            localfiles.write_file_atomically(reference.key, data, roots=self.data_roots, field=field)
        else:
            store, bucket = self._s3(reference)
            store.put(bucket, reference.key, data, content_type=content_type)
        return len(data)
