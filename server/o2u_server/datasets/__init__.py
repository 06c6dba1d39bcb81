"""Loading a dataset named by URI into the arrays the engine scores, within the server's limits.

Formats: a NumPy `.npz` (`x` images or feature vectors, `y` labels, optional `ids` and
`class_names`), an image folder (`<prefix>/<class>/<file>.png|jpg|jpeg`, classes sorted by name), and
CSV or JSONL manifests of `key,label` with keys relative to the manifest's folder. Every limit is
checked as early as the information exists: object sizes from the listing or stat before anything
is downloaded (`max_dataset_bytes`), the sample count from the `.npz` header or the manifest/listing
(`max_samples`), image dimensions from each header before decoding (`max_image_pixels`). Errors are
the service's classes and name the URI, key, field or limit at fault. Exports of score rows (JSONL,
CSV) live in `o2u_server.datasets.exports` and are re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from o2u_server.datasets.exports import infer_export_format, write_export
from o2u_server.datasets.images import ImageItem, load_images
from o2u_server.datasets.labels import encode_labels
from o2u_server.datasets.manifests import locate_keys, parse_manifest
from o2u_server.datasets.npz_archive import NpzArchive
from o2u_server.errors import InvalidArgument, ResourceExhausted
from o2u_server.settings import Settings
from o2u_server.storage import Storage

__all__ = [
    "FORMATS",
    "DatasetLimits",
    "LoadedDataset",
    "infer_export_format",
    "infer_format",
    "load_dataset",
    "write_export",
]

FORMATS = ("npz", "image_folder", "csv_manifest", "jsonl_manifest")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class DatasetLimits:
    max_bytes: int  # sum of the dataset's object sizes (and of its decoded images)
    max_samples: int
    max_image_pixels: int  # width x height of one image

    @classmethod
    def from_settings(cls, settings: Settings) -> DatasetLimits:
        return cls(settings.max_dataset_bytes, settings.max_samples, settings.max_image_pixels)


@dataclass
class LoadedDataset:
    features: np.ndarray[Any, Any]  # images (N,H,W) / (N,H,W,C) uint8, or feature vectors (N,D)
    labels: np.ndarray[Any, np.dtype[np.int64]]  # (N,) in [0, K)
    keys: list[str]  # per sample: the `ids` entry, the path relative to the folder, or the manifest key
    class_names: list[str]  # K names
    bytes_read: int  # from storage, for o2u_dataset_bytes_read_total
    source: Literal["s3", "file"]


def infer_format(uri: str) -> str:
    """The format a URI implies: `.npz`, `.csv`, `.jsonl`/`.ndjson`, else an image folder."""
    path = uri.split("://", 1)[-1].rstrip("/").lower()
    if path.endswith(".npz"):
        return "npz"
    if path.endswith(".csv"):
        return "csv_manifest"
    if path.endswith((".jsonl", ".ndjson")):
        return "jsonl_manifest"
    return "image_folder"


def load_dataset(
    uri: str,
    fmt: str | None,
    storage: Storage,
    limits: DatasetLimits,
    progress: Progress | None = None,
    *,
    field: str = "dataset.uri",
) -> LoadedDataset:
    """Read, check and decode the dataset at `uri`; progress(done, total) is called as it goes
    (from the calling thread): `.npz` reports (0, N) then (N, N); image datasets count two steps per
    image, read then decoded, so total = 2N.

    Raises InvalidArgument, PermissionDenied, NotFound, ResourceExhausted (limits) or Unavailable.
    """
    fmt = fmt or infer_format(uri)
    if fmt not in FORMATS:
        raise InvalidArgument(
            f"dataset.format {fmt!r} is not one of {', '.join(FORMATS)}",
            reason="INVALID_FORMAT",
            field="dataset.format",
        )
    ref = storage.parse(uri, field=field, allow_prefix=fmt == "image_folder")
    if fmt == "npz":
        dataset = _load_npz(uri, storage, limits, progress, field)
    elif fmt == "image_folder":
        dataset = _load_image_folder(uri, storage, limits, progress, field)
    else:
        dataset = _load_manifest(uri, storage, limits, progress, field, jsonl=fmt == "jsonl_manifest")
    dataset.source = ref.scheme
    return dataset


def _too_large(what: str, size: int, limits: DatasetLimits) -> ResourceExhausted:
    return ResourceExhausted(
        f"{what} holds {size} bytes, more than max_dataset_bytes (O2U_MAX_DATASET_BYTES) = "
        f"{limits.max_bytes}",
        reason="DATASET_TOO_LARGE",
        metadata={"limit": "max_dataset_bytes"},
    )


def _too_many(what: str, count: int, limits: DatasetLimits) -> ResourceExhausted:
    return ResourceExhausted(
        f"{what} holds {count} samples, more than max_samples (O2U_MAX_SAMPLES) = {limits.max_samples}",
        reason="TOO_MANY_SAMPLES",
        metadata={"limit": "max_samples"},
    )


def _empty(uri: str, expected: str) -> InvalidArgument:
    return InvalidArgument(
        f"dataset {uri} holds no samples ({expected})", reason="EMPTY_DATASET", field="dataset.uri"
    )


# ---- .npz -----------------------------------------------------------------------------------


def _load_npz(
    uri: str, storage: Storage, limits: DatasetLimits, progress: Progress | None, field: str
) -> LoadedDataset:
    path = storage.open_local(uri, field=field)
    source: Any
    if path is not None:
        size = path.stat().st_size
        if size > limits.max_bytes:
            raise _too_large(uri, size, limits)
        source = path
    else:
        size = storage.stat(uri, field=field).size
        if size > limits.max_bytes:
            raise _too_large(uri, size, limits)
        source = storage.read_buffer(uri, field=field, max_bytes=limits.max_bytes)
    with NpzArchive(source, uri=uri, field=field) as archive:
        members = archive.members
        missing = [name for name in ("x", "y") if name not in members]
        if missing:
            raise InvalidArgument(
                f"{uri} lacks the array(s) {', '.join(missing)}; it holds "
                f"{', '.join(sorted(members)) or 'none'} "
                "(expected x: images or features, y: labels, optional ids and class_names)",
                reason="INVALID_DATASET",
                field="dataset",
            )
        x, y = members["x"], members["y"]
        count = x.shape[0] if x.shape else 0
        if count > limits.max_samples:
            raise _too_many(uri, count, limits)
        if count == 0:
            raise _empty(uri, "x has no rows")
        if x.dtype.kind not in "biuf" or len(x.shape) not in (2, 3, 4):
            raise InvalidArgument(
                f"{uri}: x must be numbers shaped (N,D) features or (N,H,W[,C]) images, "
                f"got {x.dtype} {x.shape}",
                reason="INVALID_DATASET",
                field="dataset",
            )
        _check_npz_pixels(uri, x.shape, limits)
        for name in ("y", "ids"):
            if name in members and members[name].shape != (count,):
                raise InvalidArgument(
                    f"{uri}: {name} must have shape ({count},) to match x, got {members[name].shape}",
                    reason="INVALID_DATASET",
                    field="dataset",
                )
        inflated = sum(member.stored_bytes for member in members.values())
        if inflated > limits.max_bytes:
            raise _too_large(f"{uri} (uncompressed)", inflated, limits)
        if progress is not None:
            progress(0, count)
        class_names = None
        if "class_names" in members:
            class_names = _strings(archive.load("class_names"), uri=uri, name="class_names")
        labels, names = encode_labels(archive.load(y.name), class_names=class_names, where=uri)
        keys = _strings(archive.load("ids"), uri=uri, name="ids") if "ids" in members else None
        if keys is not None and len(set(keys)) != len(keys):
            raise InvalidArgument(f"{uri}: ids must be unique", reason="INVALID_DATASET", field="dataset")
        features = archive.load("x")
    if progress is not None:
        progress(count, count)
    return LoadedDataset(
        features=features,
        labels=labels,
        keys=keys if keys is not None else [str(i) for i in range(count)],
        class_names=names,
        bytes_read=size,
        source="file",
    )


def _check_npz_pixels(uri: str, shape: tuple[int, ...], limits: DatasetLimits) -> None:
    if len(shape) == 2:
        return
    # (N,H,W), (N,H,W,C) or (N,C,H,W): the two largest of the last three axes are the image plane.
    height, width = sorted(shape[1:])[-2:] if len(shape) == 4 else shape[1:]
    if height * width > limits.max_image_pixels:
        raise ResourceExhausted(
            f"{uri}: images of {height}x{width} pixels exceed max_image_pixels (O2U_MAX_IMAGE_PIXELS) = "
            f"{limits.max_image_pixels}",
            reason="IMAGE_TOO_LARGE",
            metadata={"limit": "max_image_pixels"},
        )


def _strings(values: np.ndarray[Any, Any], *, uri: str, name: str) -> list[str]:
    if values.ndim != 1 or values.dtype.kind not in "USiu":
        raise InvalidArgument(
            f"{uri}: {name} must be a 1-D array of strings or integers, got {values.dtype} {values.shape}",
            reason="INVALID_DATASET",
            field="dataset",
        )
    if values.dtype.kind == "S":
        return [value.decode("utf-8", "replace") for value in values.tolist()]
    return [str(value) for value in values.tolist()]


# ---- image folders and manifests --------------------------------------------------------------


def _load_image_folder(
    uri: str, storage: Storage, limits: DatasetLimits, progress: Progress | None, field: str
) -> LoadedDataset:
    prefix = uri if uri.endswith("/") else uri + "/"
    found: list[tuple[str, ImageItem]] = []
    total_bytes = 0
    for info in storage.iter_objects(prefix, field=field):
        parts = info.relative_key.split("/")
        if len(parts) < 2 or any(part.startswith(".") for part in parts):
            continue  # files beside the class folders (README, manifests) and hidden files
        if not info.relative_key.lower().endswith(IMAGE_EXTENSIONS):
            continue
        found.append((parts[0], ImageItem(info, info.relative_key)))
        total_bytes += info.size
        if len(found) > limits.max_samples:
            raise _too_many(uri, len(found), limits)
        if total_bytes > limits.max_bytes:
            raise _too_large(uri, total_bytes, limits)
    if not found:
        raise _empty(uri, "expected <folder>/<class>/<file>.png|jpg|jpeg")
    found.sort(key=lambda entry: (entry[0], entry[1].key))
    class_names = sorted({name for name, _ in found})
    labels = np.searchsorted(np.array(class_names), np.array([name for name, _ in found])).astype(np.int64)
    items = [item for _, item in found]
    images, bytes_read = load_images(
        items,
        storage,
        field=field,
        max_pixels=limits.max_image_pixels,
        max_bytes=limits.max_bytes,
        progress=progress,
    )
    return LoadedDataset(images, labels, [item.key for item in items], class_names, bytes_read, "file")


def _load_manifest(
    uri: str, storage: Storage, limits: DatasetLimits, progress: Progress | None, field: str, *, jsonl: bool
) -> LoadedDataset:
    raw = storage.read_bytes(uri, field=field, max_bytes=limits.max_bytes)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise InvalidArgument(
            f"{uri} is not UTF-8 text: {error}", reason="INVALID_DATASET", field="dataset"
        ) from error
    keys, raw_labels = parse_manifest(text, jsonl=jsonl, uri=uri, max_samples=limits.max_samples)
    if not keys:
        raise _empty(uri, "the manifest lists no rows")
    infos = locate_keys(uri, keys, storage, field=field)
    total_bytes = len(raw) + sum(info.size for info in infos)
    if total_bytes > limits.max_bytes:
        raise _too_large(f"{uri} with the images it lists", total_bytes, limits)
    labels, class_names = encode_labels(raw_labels, class_names=None, where=uri)
    items = [ImageItem(info, key) for info, key in zip(infos, keys, strict=True)]
    images, bytes_read = load_images(
        items,
        storage,
        field=field,
        max_pixels=limits.max_image_pixels,
        max_bytes=limits.max_bytes,
        progress=progress,
    )
    return LoadedDataset(images, labels, keys, class_names, bytes_read + len(raw), "file")
