"""Parsing `key,label` manifests and finding the files they list.

Manifests are CSV files with a `key,label` header or JSON Lines files of `{"key": ..., "label": ...}`.
A CSV label column made only of digits counts as integers; a JSONL file must use one JSON type
(integer or string) for all its labels. Keys are '/'-separated paths relative to the manifest's
folder: no leading '/', no empty, '.' or '..' segments, each listed once. The listed files are
located before anything is downloaded, so their total size can be checked first: one stat per local
file, or one listing of the keys' common folder in the object store.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re

from o2u_server.datasets.labels import invalid_dataset
from o2u_server.errors import NotFound, PermissionDenied, ResourceExhausted
from o2u_server.storage import ObjectInfo, Storage
from o2u_server.storage.uris import file_uri, s3_uri

__all__ = ["Manifest", "check_key", "locate_keys", "parse_manifest"]

_DIGITS = re.compile(r"^[0-9]+$")
Manifest = tuple[list[str], list[int] | list[str]]  # (keys, labels) in manifest order


def check_key(key: str, *, where: str) -> str:
    """A manifest key checked to stay below the manifest's folder."""
    if not key or "\x00" in key or key.startswith("/") or "://" in key:
        raise invalid_dataset(
            f"{where}: key {key!r} must be a non-empty path relative to the manifest's folder"
        )
    parts = key.split("/")
    if ".." in parts:
        raise PermissionDenied(
            f"{where}: key {key!r} leaves the manifest's folder ('..' is not allowed)",
            reason="PATH_TRAVERSAL",
        )
    if "" in parts or "." in parts:
        raise invalid_dataset(f"{where}: key {key!r} has an empty or '.' path segment")
    return key


def parse_manifest(text: str, *, jsonl: bool, uri: str, max_samples: int) -> Manifest:
    """Keys and labels of a CSV or JSONL manifest, checked; ResourceExhausted past `max_samples` rows."""
    rows = _jsonl_rows(text, uri) if jsonl else _csv_rows(text, uri)
    keys: list[str] = []
    raw_labels: list[object] = []
    seen: set[str] = set()
    for line, key, label in rows:
        where = f"{uri} line {line}"
        if len(keys) >= max_samples:
            raise ResourceExhausted(
                f"{uri} lists more than max_samples (O2U_MAX_SAMPLES) = {max_samples} samples",
                reason="TOO_MANY_SAMPLES",
                metadata={"limit": "max_samples"},
            )
        check_key(key, where=where)
        if key in seen:
            raise invalid_dataset(f"{where}: key {key!r} is listed twice")
        seen.add(key)
        keys.append(key)
        raw_labels.append(label)
    strings = [label for label in raw_labels if isinstance(label, str)]
    integers = [label for label in raw_labels if isinstance(label, int)]
    if len(strings) == len(raw_labels):
        if not jsonl and all(_DIGITS.match(label) for label in strings):
            return keys, [int(label) for label in strings]
        return keys, strings
    if len(integers) == len(raw_labels):
        return keys, integers
    raise invalid_dataset(f"{uri}: labels mix integers and strings; use one type for all labels")


def _csv_rows(text: str, uri: str) -> list[tuple[int, str, object]]:
    reader = csv.reader(io.StringIO(text))
    try:
        header = [name.strip().lower() for name in next(reader, [])]
        if "key" not in header or "label" not in header:
            raise invalid_dataset(
                f"{uri}: the first line must be a header naming the columns `key` and `label`"
            )
        key_column, label_column = header.index("key"), header.index("label")
        rows: list[tuple[int, str, object]] = []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) <= max(key_column, label_column):
                raise invalid_dataset(f"{uri} line {reader.line_num}: expected columns {', '.join(header)}")
            label = row[label_column].strip()
            if not label:
                raise invalid_dataset(f"{uri} line {reader.line_num}: the label is empty")
            rows.append((reader.line_num, row[key_column].strip(), label))
    except csv.Error as error:
        raise invalid_dataset(f"{uri} line {reader.line_num}: not valid CSV: {error}") from error
    return rows


def _jsonl_rows(text: str, uri: str) -> list[tuple[int, str, object]]:
    rows: list[tuple[int, str, object]] = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise invalid_dataset(f"{uri} line {line_number}: not valid JSON: {error}") from error
        if not isinstance(record, dict) or not isinstance(record.get("key"), str):
            raise invalid_dataset(
                f'{uri} line {line_number}: expected an object {{"key": "<path>", "label": ...}}'
            )
        label = record.get("label")
        if isinstance(label, bool) or not isinstance(label, int | str) or label == "":
            raise invalid_dataset(f"{uri} line {line_number}: label must be an integer or a non-empty string")
        rows.append((line_number, record["key"], label))
    return rows


def locate_keys(manifest_uri: str, keys: list[str], storage: Storage, *, field: str) -> list[ObjectInfo]:
    """Size and ETag of every listed key: one stat per file, or one listing for an object store."""
    ref = storage.parse(manifest_uri, field=field)
    if ref.scheme == "file":
        folder = os.path.dirname(ref.key)
        return [storage.stat(file_uri(os.path.join(folder, key)), field=field) for key in keys]
    assert ref.bucket is not None
    folder = ref.key.rpartition("/")[0] + "/" if "/" in ref.key else ""
    full_keys = [folder + key for key in keys]
    folders = {key.rpartition("/")[0] for key in full_keys}
    common = "" if "" in folders else os.path.commonpath(list(folders))
    listing_prefix = common + "/" if common else ""
    wanted = set(full_keys)
    listed: dict[str, ObjectInfo] = {}
    for info in storage.iter_objects(s3_uri(ref.bucket, listing_prefix), field=field):
        name = listing_prefix + info.relative_key
        if name in wanted:
            listed[name] = info
    infos = []
    for key, full_key in zip(keys, full_keys, strict=True):
        if full_key not in listed:
            uri = s3_uri(ref.bucket, full_key)
            raise NotFound(
                f"{manifest_uri} lists {key!r}, but {uri} does not exist",
                reason="OBJECT_NOT_FOUND",
                resource_type="object",
                resource_name=uri,
            )
        infos.append(listed[full_key])
    return infos
