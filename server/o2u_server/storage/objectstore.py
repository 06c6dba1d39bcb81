"""The S3-compatible object store, reached through the `minio` SDK with bounded patience.

The HTTP pool has connect and read timeouts and no retries of its own; every call goes through
`ObjectStore._call`, which retries transient failures (connection errors, 5xx answers, SlowDown) a
bounded number of times with exponential backoff and then raises Unavailable with a RetryInfo hint.
S3 error codes map to the service's errors: NoSuchKey/NoSuchBucket -> NotFound, AccessDenied and
credential errors -> PermissionDenied. The endpoint, credentials and region are settings only.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import certifi
import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError

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
            return AlreadyExists(
                f"{uri} already exists; exports never replace an object: choose a new name",
                reason="DESTINATION_EXISTS",
                resource_type="object",
                resource_name=uri,
            )
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
