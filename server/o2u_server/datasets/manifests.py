"""What the manifest formats share: checked keys, one label type, and the files a manifest lists.

A manifest lists `key,label` rows (`csv_manifest`, `jsonl_manifest`: each parses its own text into
rows, lazily). Rows are counted as they are parsed, so a manifest of millions of rows is refused at
row max_samples + 1, not after all of them are in memory. Keys are '/'-separated paths relative to
the manifest's folder: no leading '/', no empty, '.' or '..' segments, each listed once; labels are
all integers or all strings. The listed files are located before anything is downloaded, so their
total size can be checked first: one stat per local file, or one listing of the keys' common folder
in the object store. Then `datasets.images` reads and decodes them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from urllib.parse import quote

from o2u_server.datasets.dataset import (
    MAX_KEY_CHARS,
    Allocate,
    DatasetLimits,
    LoadedDataset,
    empty_dataset,
    invalid_dataset,
    too_large,
    too_many_samples,
)
from o2u_server.datasets.images import ImageItem, load_images
from o2u_server.datasets.labels import encode_labels
from o2u_server.errors import NotFound, PermissionDenied, ResourceExhausted
from o2u_server.storage import ObjectInfo, Storage
from o2u_server.storage.uris import s3_uri
from o2u_server.text import shown, text_problem

__all__ = [
    "Manifest",
    "ManifestRow",
    "check_key",
    "load_listed_images",
    "load_manifest",
    "locate_keys",
    "parse_manifest",
]

Manifest = tuple[list[str], list[int] | list[str]]  # (keys, labels) in manifest order
ManifestRow = tuple[int, str, object]  # (line number, key, label as parsed: an int or a str)
# (text, uri) -> rows, produced lazily; invalid_dataset if malformed
RowParser = Callable[[str, str], Iterable[ManifestRow]]
_DIGITS = re.compile(r"^[0-9]+$")
# Objects a manifest's listing may read beyond twice its keys before it looks them up one by one.
LISTING_SLACK = 1000


def load_manifest(
    uri: str,
    storage: Storage,
    limits: DatasetLimits,
    field: str,
    allocate: Allocate,
    *,
    parse_rows: RowParser,
    digit_labels_are_indices: bool = False,
) -> LoadedDataset:
    """The images a manifest lists, labelled as it says; `parse_rows` reads the format's rows.

    With `digit_labels_are_indices`, string labels that are all made of digits are class indices."""
    raw = storage.read_bytes(uri, field=field, max_bytes=limits.max_bytes)
    manifest_bytes = len(raw)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise invalid_dataset(f"{shown(uri)} is not UTF-8 text: {error}") from error
    del raw  # the text is what the rows are parsed from; the bytes would double the manifest's memory
    keys, raw_labels = parse_manifest(parse_rows(text, uri), uri=uri, limits=limits)
    del text
    if not keys:
        raise empty_dataset(shown(uri), "the manifest lists no rows")
    if digit_labels_are_indices and all(
        isinstance(label, str) and _DIGITS.match(label) for label in raw_labels
    ):
        raw_labels = _class_indices([str(label) for label in raw_labels], uri=uri, limits=limits)
    return load_listed_images(
        uri, keys, raw_labels, storage, limits, field, allocate, manifest_bytes=manifest_bytes
    )


def load_listed_images(
    uri: str,
    keys: list[str],
    raw_labels: list[int] | list[str],
    storage: Storage,
    limits: DatasetLimits,
    field: str,
    allocate: Allocate,
    *,
    manifest_bytes: int,
) -> LoadedDataset:
    """The images at `keys` (checked by `parse_manifest`, relative to the folder of the manifest at
    `uri`, which took `manifest_bytes`), labelled by `raw_labels`."""
    infos = locate_keys(uri, keys, storage, field=field)
    total_bytes = manifest_bytes + sum(info.size for info in infos)
    if total_bytes > limits.max_bytes:
        raise too_large(f"{shown(uri)} with the images it lists", total_bytes, limits)
    labels, class_names = encode_labels(raw_labels, class_names=None, where=shown(uri), limits=limits)
    items = [ImageItem(info, key) for info, key in zip(infos, keys, strict=True)]
    images, bytes_read = load_images(
        items,
        storage,
        field=field,
        max_pixels=limits.max_image_pixels,
        max_decoded_bytes=limits.max_decoded_bytes,
        allocate=allocate,
    )
    return LoadedDataset(
        images, labels, keys, class_names, bytes_read + manifest_bytes, "file", files_read=len(keys) + 1
    )


def _class_indices(labels: list[str], *, uri: str, limits: DatasetLimits) -> list[int]:
    """Labels made of digits as class indices; one with more digits than any class count could have
    is refused before Python is asked to build a huge integer."""
    digits = len(str(limits.max_classes))
    for label in labels:
        if len(label.lstrip("0")) > digits:
            raise ResourceExhausted(
                f"{shown(uri)}: label {shown(label, 40)} is a class index above max_classes "
                f"(O2U_MAX_CLASSES) = {limits.max_classes}",
                reason="TOO_MANY_CLASSES",
                metadata={"limit": "max_classes"},
            )
    return [int(label) for label in labels]


def check_key(key: str, *, where: str) -> str:
    """A manifest key checked to stay below the manifest's folder."""
    if not key or "\x00" in key or key.startswith("/") or "://" in key:
        raise invalid_dataset(
            f"{where}: key {shown(key, 80)!r} must be a non-empty path relative to the manifest's folder"
        )
    parts = key.split("/")
    if ".." in parts:
        raise PermissionDenied(
            f"{where}: key {shown(key, 80)!r} leaves the manifest's folder ('..' is not allowed)",
            reason="PATH_TRAVERSAL",
        )
    if "" in parts or "." in parts:
        raise invalid_dataset(f"{where}: key {shown(key, 80)!r} has an empty or '.' path segment")
    problem = text_problem(key, max_chars=MAX_KEY_CHARS)
    if problem is not None:
        raise invalid_dataset(f"{where}: key {shown(key, 80)!r} {problem}")
    return key


def parse_manifest(rows: Iterable[ManifestRow], *, uri: str, limits: DatasetLimits) -> Manifest:
    """Keys and labels of parsed rows, checked; ResourceExhausted at row `max_samples` + 1, before
    any further row is parsed."""
    keys: list[str] = []
    raw_labels: list[object] = []
    seen: set[str] = set()
    for line, key, label in rows:
        where = f"{shown(uri)} line {line}"
        if len(keys) >= limits.max_samples:
            raise too_many_samples(f"{shown(uri)} (at line {line})", len(keys) + 1, limits)
        check_key(key, where=where)
        if key in seen:
            raise invalid_dataset(f"{where}: key {shown(key, 80)!r} is listed twice")
        seen.add(key)
        keys.append(key)
        raw_labels.append(label)
    strings = [label for label in raw_labels if isinstance(label, str)]
    integers = [label for label in raw_labels if isinstance(label, int)]
    if len(strings) == len(raw_labels):
        return keys, strings
    if len(integers) == len(raw_labels):
        return keys, integers
    raise invalid_dataset(f"{shown(uri)}: labels mix integers and strings; use one type for all labels")


def locate_keys(manifest_uri: str, keys: list[str], storage: Storage, *, field: str) -> list[ObjectInfo]:
    """Size and ETag of every listed key: one stat per file, or one listing for an object store."""
    reference = storage.parse(manifest_uri, field=field)
    if reference.scheme == "file":
        folder = manifest_uri.rpartition("/")[0]  # the caller's URI, so messages never show server paths
        infos = []
        for key in keys:
            storage.reads.check()
            infos.append(storage.stat(f"{folder}/{quote(key, safe='/')}", field=field))
        return infos
    assert reference.bucket is not None
    folder = reference.key.rpartition("/")[0] + "/" if "/" in reference.key else ""
    full_keys = [folder + key for key in keys]
    folders = {key.rpartition("/")[0] for key in full_keys}
    common = "" if "" in folders else os.path.commonpath(list(folders))
    listing_prefix = common + "/" if common else ""
    wanted = set(full_keys)
    listed: dict[str, ObjectInfo] = {}
    # The listing covers the keys' common folder, which can be the whole bucket (a manifest at its
    # root, or keys in unrelated folders): past a budget of objects it stops, and the keys still
    # missing are looked up one by one, so the cost follows the manifest, not the bucket.
    budget = 2 * len(wanted) + LISTING_SLACK
    listing = storage.iter_objects(s3_uri(reference.bucket, listing_prefix), field=field)
    for seen, info in enumerate(listing, start=1):
        name = listing_prefix + info.relative_key
        if name in wanted:
            listed[name] = info
            if len(listed) == len(wanted):
                break
        if seen > budget:
            for name in full_keys:  # in manifest order, up to the first that does not exist
                if name not in listed:
                    storage.reads.check()
                    try:
                        listed[name] = storage.stat(s3_uri(reference.bucket, name), field=field)
                    except NotFound:
                        break  # reported below, with the manifest's key
            break
    infos = []
    for key, full_key in zip(keys, full_keys, strict=True):
        if full_key not in listed:
            uri = s3_uri(reference.bucket, full_key)
            raise NotFound(
                f"{shown(manifest_uri)} lists {shown(key, 80)!r}, but {shown(uri)} does not exist",
                reason="OBJECT_NOT_FOUND",
                resource_type="object",
                resource_name=shown(uri),
            )
        infos.append(listed[full_key])
    return infos
