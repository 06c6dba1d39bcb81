"""Parsing and checking of dataset and export URIs, before anything is read.

Two schemes exist. `s3://bucket/key` names an object in the server's one object store: the endpoint,
credentials and region are settings, so a URI that names a host, a port or user info is refused, and
the bucket must be allow-listed when a list is configured. `file:///absolute/path` names a file under
one of the configured data roots: the path is percent-decoded once, `..` segments and encoded
separators left after decoding are refused, and the fully resolved path (symlinks followed) must lie
inside a resolved root, so neither traversal nor a symlink can reach outside the roots. The same
rules, with the export folders as roots and the export prefixes as buckets, check where exports
go. A URI is at most MAX_URI_CHARS long and its path valid UTF-8; messages quote the URI the caller
sent (shortened), never a resolved path or the server's roots.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import quote, unquote_to_bytes

from o2u_server.errors import InvalidArgument, PermissionDenied
from o2u_server.text import shown, text_problem

__all__ = [
    "MAX_URI_CHARS",
    "ObjectReference",
    "file_uri",
    "inside",
    "parse_uri",
    "resolve_roots",
    "s3_uri",
    "under_prefix",
]

MAX_URI_CHARS = 4096  # longer dataset, weights and export URIs are refused

# S3 bucket naming rules: 3-63 characters of lowercase letters, digits, dots and hyphens, starting and
# ending with a letter or digit.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_BUCKET_RESERVED_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_BUCKET_RESERVED_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")
# What a second round of percent-decoding would turn into a dot, a separator or a NUL.
_ENCODED_SPECIAL = re.compile(r"%(2e|2f|5c|00)", re.IGNORECASE)


@dataclass(frozen=True)
class ObjectReference:
    """A checked reference: an object in a bucket, or a resolved absolute path under a data root."""

    scheme: Literal["s3", "file"]
    bucket: str | None
    key: str  # object name for s3; resolved absolute path for file

    @property
    def uri(self) -> str:
        if self.scheme == "s3":
            assert self.bucket is not None
            return s3_uri(self.bucket, self.key)
        return file_uri(self.key)


def s3_uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def file_uri(path: str | os.PathLike[str]) -> str:
    return "file://" + quote(os.fspath(path), safe="/")


def inside(path: str, root: str) -> bool:
    """Whether the absolute path `path` is `root` or below it (both already resolved)."""
    return path == root or path.startswith(root.rstrip("/") + "/")


def parse_uri(
    uri: str,
    *,
    field: str,
    data_roots: Sequence[str],
    allowed_buckets: Sequence[str],
    allow_prefix: bool = False,
) -> ObjectReference:
    """Check `uri` and return what it points at; raise InvalidArgument or PermissionDenied naming `field`.

    `data_roots` must be resolved absolute paths. `allow_prefix` accepts an s3 URI with an empty key
    (a whole bucket, for listings).
    """
    if not isinstance(uri, str) or not uri:
        raise InvalidArgument(
            f"{field} is empty; give an s3:// or file:// URI", reason="INVALID_URI", field=field
        )
    if len(uri) > MAX_URI_CHARS:
        raise InvalidArgument(
            f"{field} is {len(uri)} characters long; URIs may be at most {MAX_URI_CHARS}",
            reason="URI_TOO_LONG",
            field=field,
        )
    if "\x00" in uri:
        raise InvalidArgument(f"{field} contains a NUL character", reason="INVALID_URI", field=field)
    problem = text_problem(uri, max_chars=MAX_URI_CHARS)
    if problem is not None:  # percent-encode such characters
        raise InvalidArgument(f"{field} {problem}", reason="INVALID_URI", field=field)
    scheme, sep, rest = uri.partition("://")
    if not sep:
        raise InvalidArgument(
            f"{field} {shown(uri)!r} is not a URI; use s3://bucket/key or file:///absolute/path",
            reason="INVALID_URI",
            field=field,
        )
    if scheme == "s3":
        return _parse_s3(uri, rest, field=field, allowed_buckets=allowed_buckets, allow_prefix=allow_prefix)
    if scheme == "file":
        return _parse_file(uri, rest, field=field, data_roots=data_roots)
    raise InvalidArgument(
        f"{field} {shown(uri)!r} has unsupported scheme {shown(scheme, 20)!r}; use s3:// (the server's "
        "object store) or "
        "file:// (a path under a data root)",
        reason="UNSUPPORTED_SCHEME",
        field=field,
    )


def _parse_s3(
    uri: str, rest: str, *, field: str, allowed_buckets: Sequence[str], allow_prefix: bool
) -> ObjectReference:
    bucket, _, key = rest.partition("/")
    if "@" in bucket or ":" in bucket:
        raise InvalidArgument(
            f"{field} {shown(uri)!r} names a host, port or user; s3 URIs name only s3://bucket/key, the "
            "object "
            "store endpoint and credentials are server settings",
            reason="S3_ENDPOINT_IN_URI",
            field=field,
        )
    _check_bucket(bucket, uri=uri, field=field)
    if allowed_buckets and bucket not in allowed_buckets:
        raise PermissionDenied(
            f"{field} {shown(uri)!r}: bucket {bucket!r} is not one this server may use "
            "(O2U_S3_ALLOWED_BUCKETS)",
            reason="BUCKET_NOT_ALLOWED",
            field=field,
            resource_type="bucket",
            resource_name=bucket,
        )
    if not key and not allow_prefix:
        raise InvalidArgument(
            f"{field} {shown(uri)!r} names a bucket but no object key", reason="INVALID_URI", field=field
        )
    if any(part in (".", "..") for part in key.split("/")):
        raise InvalidArgument(
            f"{field} {shown(uri)!r}: object keys may not contain '.' or '..' segments",
            reason="INVALID_URI",
            field=field,
        )
    return ObjectReference("s3", bucket, key)


def _check_bucket(bucket: str, *, uri: str, field: str) -> None:
    reasons = []
    if not _BUCKET.match(bucket):
        reasons.append(
            "3-63 lowercase letters, digits, '.' or '-', starting and ending with a letter or digit"
        )
    if ".." in bucket or ".-" in bucket or "-." in bucket:
        reasons.append("no '..', '.-' or '-.'")
    if bucket.startswith(_BUCKET_RESERVED_PREFIXES) or bucket.endswith(_BUCKET_RESERVED_SUFFIXES):
        reasons.append("no reserved prefix or suffix")
    try:
        ipaddress.ip_address(bucket)
        reasons.append("not an IP address")
    except ValueError:
        pass
    if reasons:
        raise InvalidArgument(
            f"{field} {shown(uri)!r}: {shown(bucket, 70)!r} is not a valid bucket name "
            f"({'; '.join(reasons)})",
            reason="INVALID_BUCKET",
            field=field,
        )


def _parse_file(uri: str, rest: str, *, field: str, data_roots: Sequence[str]) -> ObjectReference:
    if not rest.startswith("/"):
        raise InvalidArgument(
            f"{field} {shown(uri)!r}: file URIs take an absolute path and no host: file:///absolute/path",
            reason="INVALID_URI",
            field=field,
        )
    if "?" in rest or "#" in rest:
        raise InvalidArgument(
            f"{field} {shown(uri)!r}: percent-encode '?' and '#' in file paths (%3F, %23)",
            reason="INVALID_URI",
            field=field,
        )
    try:
        path = unquote_to_bytes(rest).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument(
            f"{field} {shown(uri)!r}: the percent-decoded path is not valid UTF-8",
            reason="INVALID_URI",
            field=field,
        ) from None
    if "\x00" in path:
        raise InvalidArgument(
            f"{field} {shown(uri)!r} contains an encoded NUL character", reason="INVALID_URI", field=field
        )
    if ".." in path.split("/") or _ENCODED_SPECIAL.search(path):
        raise PermissionDenied(
            f"{field} {shown(uri)!r}: '..' segments and double-encoded separators are not allowed in "
            "file paths",
            reason="PATH_TRAVERSAL",
            field=field,
        )
    if not data_roots:
        raise PermissionDenied(
            f"{field} {shown(uri)!r}: this server has no data roots (O2U_DATA_ROOTS), so it reads no "
            "local files",
            reason="PATH_OUTSIDE_DATA_ROOTS",
            field=field,
        )
    real = os.path.realpath(path)
    if not any(inside(real, root) for root in data_roots):
        raise PermissionDenied(
            f"{field} {shown(uri)!r} resolves outside the server's data roots (O2U_DATA_ROOTS)",
            reason="PATH_OUTSIDE_DATA_ROOTS",
            field=field,
        )
    return ObjectReference("file", None, real)


def under_prefix(key: str, prefix: str) -> bool:
    """Whether the object key `key` lies under the key prefix `prefix` ('' is the whole bucket),
    segment by segment: `exports/a` is under `exports`, `exports-old/a` is not."""
    prefix = prefix.strip("/")
    return not prefix or key == prefix or key.startswith(prefix + "/")


def resolve_roots(roots: Sequence[Path]) -> list[str]:
    """Resolved absolute data roots; relative roots are taken from the working directory."""
    return [os.path.realpath(os.path.abspath(root)) for root in roots]
