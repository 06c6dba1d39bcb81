"""The S3-compatible object store, reached through the `minio` SDK with bounded patience.

The HTTP pool has connect and read timeouts and no retries of its own; every call goes through
`ObjectStore._call`, which retries transient failures (connection errors, 5xx answers, SlowDown) a
bounded number of times with exponential backoff and then raises Unavailable with a RetryInfo hint.
S3 error codes map to the service's errors: NoSuchKey/NoSuchBucket -> NotFound, AccessDenied and
credential errors -> PermissionDenied. The endpoint, credentials and region are settings only.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, TypeVar, cast
from xml.etree import ElementTree

import certifi
import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError
from minio.helpers import md5sum_hash

from o2u_server.errors import (
    AlreadyExists,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from o2u_server.storage.uris import s3_uri
from o2u_server.text import shown

__all__ = ["ObjectStore", "RetryPolicy"]

T = TypeVar("T")
MIB = 1024 * 1024
MAX_SINGLE_PUT_BYTES = 5 * 1024**3  # S3's limit for one PUT
# One part of a streamed upload: what `create_streamed` holds in memory. S3 takes parts of 5 MiB to
# 5 GiB (the last may be smaller) and 10,000 of them: up to 160 GiB at this size.
PART_BYTES = 16 * MIB
_MAX_PARTS = 10_000
_RETRYABLE_CODES = {
    "SlowDown",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "XMinioServerNotInitialized",
}
_DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"}
_TRANSIENT = (ServerError, InvalidResponseError, urllib3.exceptions.HTTPError, OSError)


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try the object store before answering Unavailable. A store refusing connections
    costs the backoff delays (0.5 + 1 s by default); a silent one about attempts x the timeouts."""

    attempts: int = 3
    base_delay_seconds: float = 0.5  # doubled after every failed try
    connect_timeout_seconds: float = 2.0
    read_timeout_seconds: float = 10.0  # longest silence within one response, not its total time


class ObjectStore:
    """Blocking, thread-safe calls on one bucket-addressed store (minio clients share one HTTP pool)."""

    def __init__(
        self,
        endpoint: str,
        *,
        access_key: str | None,
        secret_key: str | None,
        secure: bool,
        region: str | None,
        retry: RetryPolicy,
        max_connections: int,
    ) -> None:
        self.endpoint = endpoint
        self.retry = retry
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=retry.connect_timeout_seconds, read=retry.read_timeout_seconds),
            retries=False,  # _call retries, with backoff and a bound
            maxsize=max_connections,
            cert_reqs="CERT_REQUIRED",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        )
        try:
            self._client = Minio(
                endpoint,
                access_key=access_key,
                secret_key=secret_key,
                secure=secure,
                region=region,
                http_client=http,
            )
        except ValueError as error:
            raise ValueError(f"O2U_S3_ENDPOINT {endpoint!r} is not host:port: {error}") from error

    def stat(self, bucket: str, key: str) -> tuple[int, str]:
        """(size, ETag) of one object."""
        found = self._call(lambda: self._client.stat_object(bucket, key), uri=s3_uri(bucket, key))
        return int(found.size or 0), found.etag or ""

    def read(
        self,
        bucket: str,
        key: str,
        *,
        max_bytes: int | None,
        on_chunk: Callable[[int], None] = lambda size: None,
    ) -> bytearray:
        """The whole object; ResourceExhausted as soon as more than `max_bytes` have arrived.

        `on_chunk` sees the size of every chunk that arrives (and may raise to stop)."""
        uri = s3_uri(bucket, key)

        def download() -> bytearray:
            on_chunk(0)  # a stopped job makes no new attempt
            response = self._client.get_object(bucket, key)
            try:
                data = bytearray()
                for chunk in response.stream(MIB):
                    data += chunk
                    on_chunk(len(chunk))
                    if max_bytes is not None and len(data) > max_bytes:
                        raise ResourceExhausted(
                            f"{shown(uri)} is larger than the {max_bytes} bytes left under max_dataset_bytes "
                            "(O2U_MAX_DATASET_BYTES)",
                            reason="DATASET_TOO_LARGE",
                            metadata={"limit": "max_dataset_bytes"},
                        )
                return data
            finally:
                response.close()
                response.release_conn()

        return self._call(download, uri=uri)

    def iter_objects(self, bucket: str, prefix: str) -> Iterator[tuple[str, int, str]]:
        """(name, size, ETag) of every object under `prefix`, in key order, page by page."""
        last: str | None = None
        failures = 0
        while True:
            try:
                # start_after resumes a listing that failed half-way without repeating objects.
                for found in self._client.list_objects(
                    bucket, prefix=prefix, recursive=True, start_after=last
                ):
                    name = found.object_name or ""
                    last = name
                    if not found.is_dir:
                        yield name, int(found.size or 0), found.etag or ""
                return
            except S3Error as error:
                if error.code not in _RETRYABLE_CODES:
                    raise self._s3_error(error, s3_uri(bucket, prefix)) from error
                failures = self._backoff(failures, error, s3_uri(bucket, prefix))
            except _TRANSIENT as error:
                failures = self._backoff(failures, error, s3_uri(bucket, prefix))

    def put(self, bucket: str, key: str, data: bytes, *, content_type: str) -> None:
        self._call(
            lambda: self._client.put_object(
                bucket, key, io.BytesIO(data), len(data), content_type=content_type
            ),
            uri=s3_uri(bucket, key),
        )

    def remove(self, bucket: str, key: str) -> None:
        """Delete one object (S3 answers success for a key that does not exist)."""
        self._call(lambda: self._client.remove_object(bucket, key), uri=s3_uri(bucket, key))

    def create(self, bucket: str, key: str, data: bytes, *, content_type: str) -> None:
        """Store a new object in one PUT with `If-None-Match: *`: AlreadyExists if the key is taken.

        The SDK's put_object turns unknown headers into user metadata and splits large bodies into
        multipart uploads, so this sends the single conditional PUT itself (S3, MinIO)."""
        uri = s3_uri(bucket, key)
        if len(data) > MAX_SINGLE_PUT_BYTES:
            raise ResourceExhausted(
                f"the export for {shown(uri)} holds {len(data)} bytes, more than one upload may "
                f"({MAX_SINGLE_PUT_BYTES}); export only the suspected samples",
                reason="EXPORT_TOO_LARGE",
            )
        headers: dict[str, str | list[str] | tuple[str]] = {
            "Content-Type": content_type,
            "If-None-Match": "*",
        }
        self._call(lambda: self._client._put_object(bucket, key, data, headers), uri=uri)

    def create_streamed(
        self, bucket: str, key: str, write: Callable[[BinaryIO], None], *, content_type: str
    ) -> int:
        """Store a new object that `write` writes, holding at most one part (PART_BYTES) in memory;
        returns its size. A body that fits one part goes in `create`'s one conditional PUT. A larger
        one goes in a multipart upload, whose CompleteMultipartUpload carries `If-None-Match: *`
        (S3, MinIO): the object appears complete or not at all, and never replaces one. A name that
        is taken when the first part is ready is AlreadyExists before any part is sent; an upload
        that fails is aborted, so its parts are not left behind to be billed."""
        sink = _PartSink(self, bucket, key, content_type)
        try:
            write(cast(BinaryIO, sink))
            return sink.finish()
        except BaseException:
            sink.abort()
            raise

    def _call(self, operation: Callable[[], T], *, uri: str) -> T:
        failures = 0
        while True:
            try:
                return operation()
            except ServiceError:
                raise
            except S3Error as error:
                if error.code not in _RETRYABLE_CODES:
                    raise self._s3_error(error, uri) from error
                failures = self._backoff(failures, error, uri)
            except _TRANSIENT as error:
                failures = self._backoff(failures, error, uri)

    def _backoff(self, failures: int, error: Exception, uri: str) -> int:
        failures += 1
        if failures >= self.retry.attempts:
            raise Unavailable(
                f"object store {self.endpoint} did not answer for {shown(uri)} after {failures} tries "
                f"({type(error).__name__}: {error}); retry later or check O2U_S3_ENDPOINT",
                reason="OBJECT_STORE_UNAVAILABLE",
                resource_type="object_store",
                resource_name=self.endpoint,
                retry_after_seconds=max(1.0, self.retry.base_delay_seconds * 2**failures),
            ) from error
        time.sleep(self.retry.base_delay_seconds * 2 ** (failures - 1))
        return failures

    @staticmethod
    def _s3_error(error: S3Error, uri: str) -> ServiceError:
        uri = shown(uri)
        if error.code in ("PreconditionFailed", "ConditionalRequestConflict"):  # If-None-Match: *
            return _taken(uri)
        if error.code in ("NoSuchKey", "NoSuchObject"):
            return NotFound(
                f"object {uri} does not exist",
                reason="OBJECT_NOT_FOUND",
                resource_type="object",
                resource_name=uri,
            )
        if error.code == "NoSuchBucket":
            bucket = uri.removeprefix("s3://").split("/", 1)[0]
            return NotFound(
                f"bucket {bucket!r} of {uri} does not exist",
                reason="BUCKET_NOT_FOUND",
                resource_type="bucket",
                resource_name=bucket,
            )
        if error.code in _DENIED_CODES:
            return PermissionDenied(
                f"the object store denied the server's credentials access to {uri} ({error.code})",
                reason="OBJECT_STORE_ACCESS_DENIED",
                resource_type="object",
                resource_name=uri,
            )
        return Unavailable(
            f"the object store refused the request for {uri}: {error.code}: {error.message}",
            reason="OBJECT_STORE_ERROR",
            resource_type="object",
            resource_name=uri,
        )


def _taken(uri: str) -> AlreadyExists:
    """A conditional write found the name taken (`uri` as shown in messages)."""
    return AlreadyExists(
        f"{uri} already exists; exports never replace an object: choose a new name",
        reason="DESTINATION_EXISTS",
        resource_type="object",
        resource_name=uri,
    )


class _PartSink(io.BufferedIOBase):
    """The writable end of `ObjectStore.create_streamed`: buffers one part, uploads each full one."""

    def __init__(self, store: ObjectStore, bucket: str, key: str, content_type: str) -> None:
        super().__init__()
        self._store, self._bucket, self._key, self._content_type = store, bucket, key, content_type
        self._uri = s3_uri(bucket, key)
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._etags: list[str] = []
        self._size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        self._buffer += data
        while len(self._buffer) >= PART_BYTES:
            if self._upload_id is None:
                self._start()
            part, self._buffer = self._buffer, bytearray(self._buffer[PART_BYTES:])
            del part[PART_BYTES:]
            self._send(part)
        return len(data)

    def _start(self) -> None:
        """Begin the multipart upload, unless the name is already taken."""
        if self._exists():
            raise _taken(shown(self._uri))
        client = self._store._client
        headers: dict[str, str | list[str] | tuple[str]] = {"Content-Type": self._content_type}
        self._upload_id = self._store._call(
            lambda: client._create_multipart_upload(self._bucket, self._key, headers), uri=self._uri
        )

    def _send(self, part: bytearray) -> None:
        """Upload `part` as the next part, then empty it: the HTTP stack keeps reference cycles to
        a request's body until the garbage collector runs, and an emptied buffer holds no memory."""
        client = self._store._client
        if len(self._etags) >= _MAX_PARTS:
            raise ResourceExhausted(
                f"the export for {shown(self._uri)} is larger than one upload may be "
                f"({_MAX_PARTS} parts of {PART_BYTES} bytes); export only the suspected samples",
                reason="EXPORT_TOO_LARGE",
            )
        number, upload_id = len(self._etags) + 1, self._upload_id
        assert upload_id is not None, "_start comes before the first part"
        body = cast(bytes, part)  # sent as it is: the SDK needs only len() and the buffer protocol
        etag = self._store._call(
            lambda: client._upload_part(self._bucket, self._key, body, None, upload_id, number), uri=self._uri
        )
        self._etags.append(etag)
        self._size += len(part)
        part.clear()

    def _exists(self) -> bool:
        try:
            self._store.stat(self._bucket, self._key)
        except NotFound:
            return False
        return True

    def finish(self) -> int:
        """Send what is left: one PUT if no part went yet, else the last part and the completion."""
        if self._upload_id is None:
            data = bytes(self._buffer)
            self._buffer.clear()
            self._store.create(self._bucket, self._key, data, content_type=self._content_type)
            return len(data)
        if self._buffer:  # the upload began with a full part: any rest is the last
            last, self._buffer = self._buffer, bytearray()
            self._send(last)
        element = ElementTree.Element("CompleteMultipartUpload")
        for number, etag in enumerate(self._etags, start=1):
            part = ElementTree.SubElement(element, "Part")
            ElementTree.SubElement(part, "PartNumber").text = str(number)
            ElementTree.SubElement(part, "ETag").text = f'"{etag}"'
        body = ElementTree.tostring(element)
        headers: dict[str, str | list[str] | tuple[str]] = {
            "Content-Type": "application/xml",
            "Content-MD5": md5sum_hash(body) or "",
            "If-None-Match": "*",  # the multipart twin of create's conditional PUT
        }
        query: dict[str, str | list[str] | tuple[str]] = {"uploadId": self._upload_id}
        client = self._store._client
        self._store._call(
            lambda: client._execute(
                "POST", self._bucket, self._key, body=body, headers=headers, query_params=query
            ),
            uri=self._uri,
        )
        self._upload_id = None  # complete: nothing to abort
        return self._size

    def abort(self) -> None:
        """Drop the parts sent so far (best effort: the upload has already failed)."""
        if self._upload_id is None:
            return
        upload_id, self._upload_id = self._upload_id, None
        with contextlib.suppress(ServiceError, S3Error, *_TRANSIENT):
            self._store._client._abort_multipart_upload(self._bucket, self._key, upload_id)
