"""What every dataset format shares: the limits a loader checks, the arrays it returns, and the
errors that name the dataset, the limit and its setting.

`check_loaded` is the last check of every loaded dataset, whatever its format: the decoded size and
stage 2's N x K per-class state (votes and probabilities) against `max_decoded_bytes`, and every
key and class name against the text rules (`o2u_server.text`). `content_digest` is what the job
remembers of the data it trained on, so a resumed job notices when the dataset changed in between.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from o2u_server.domain import DatasetOptions, SkippedRecords
from o2u_server.errors import InvalidArgument, ResourceExhausted
from o2u_server.settings import MAX_CLASS_NAME_CHARS, Settings
from o2u_server.storage import Storage
from o2u_server.text import shown, text_problem

__all__ = [
    "MAX_CLASS_NAME_CHARS",
    "MAX_KEY_CHARS",
    "Allocate",
    "DatasetLimits",
    "LoadedDataset",
    "Loader",
    "PlainLoader",
    "check_loaded",
    "content_digest",
    "empty_dataset",
    "invalid_dataset",
    "too_large",
    "too_many_classes",
    "too_many_samples",
    "too_much_decoded",
]

MAX_KEY_CHARS = 1024  # a sample key (file path, manifest key or `ids` entry), in characters
_DIGEST_CHUNK = 16 * 1024 * 1024


# Training-device bytes of stage 2's votes and probabilities per (sample, class): the engine's
# o2u_engine.statistics.STATE_BYTES_PER_SAMPLE_CLASS, restated so that loading data never imports
# the engine (and torch); a test keeps the two equal.
STAGE_2_BYTES_PER_SAMPLE_CLASS = 10


@dataclass(frozen=True)
class DatasetLimits:
    max_bytes: int  # sum of the dataset's object sizes
    max_samples: int
    max_image_pixels: int  # width x height of one image
    max_classes: int = 1000
    max_decoded_bytes: int = 8 * 1024**3  # decoded arrays, and stage 2's N x K per-class state

    @classmethod
    def from_settings(cls, settings: Settings) -> DatasetLimits:
        return cls(
            settings.max_dataset_bytes,
            settings.max_samples,
            settings.max_image_pixels,
            settings.max_classes,
            settings.max_decoded_bytes,
        )


@dataclass
class LoadedDataset:
    features: np.ndarray[Any, Any]  # images (N,H,W) / (N,H,W,C) uint8, or feature vectors (N,D)
    labels: np.ndarray[Any, np.dtype[np.int64]]  # (N,) in [0, K)
    keys: list[str]  # per sample: the `ids` entry, the path relative to the folder, or the manifest key
    class_names: list[str]  # K names
    bytes_read: int  # from storage, for o2u_dataset_bytes_read_total
    source: Literal["s3", "file"]
    files_read: int = 0  # files or objects read from storage
    digest: str = ""  # content_digest, set by load_dataset
    skipped: list[SkippedRecords] = field(default_factory=list)  # records left out, per reason


# Where a loader decodes the samples: (shape, dtype) -> an uninitialized C-ordered array. np.empty,
# or shared memory when the job trains in other processes that read the samples from there.
Allocate = Callable[[tuple[int, ...], np.dtype[Any]], np.ndarray[Any, Any]]
# A format's loader: (uri, storage, limits, field, options, allocate) -> the dataset, every limit
# checked as early as the information exists. `field` names the request field in errors
# ("dataset.uri"); `options` are the job's, already checked to suit the format (`datasets.options`).
Loader = Callable[[str, Storage, DatasetLimits, str, DatasetOptions, Allocate], LoadedDataset]
# A loader of a format that has no options.
PlainLoader = Callable[[str, Storage, DatasetLimits, str, Allocate], LoadedDataset]


def invalid_dataset(message: str) -> InvalidArgument:
    return InvalidArgument(message, reason="INVALID_DATASET", field="dataset")


def empty_dataset(uri: str, expected: str) -> InvalidArgument:
    return InvalidArgument(
        f"dataset {uri} holds no samples ({expected})", reason="EMPTY_DATASET", field="dataset.uri"
    )


def too_large(what: str, size: int, limits: DatasetLimits) -> ResourceExhausted:
    return ResourceExhausted(
        f"{what} holds {size} bytes, more than max_dataset_bytes (O2U_MAX_DATASET_BYTES) = "
        f"{limits.max_bytes}",
        reason="DATASET_TOO_LARGE",
        metadata={"limit": "max_dataset_bytes"},
    )


def too_many_samples(what: str, count: int, limits: DatasetLimits) -> ResourceExhausted:
    return ResourceExhausted(
        f"{what} holds {count} samples, more than max_samples (O2U_MAX_SAMPLES) = {limits.max_samples}",
        reason="TOO_MANY_SAMPLES",
        metadata={"limit": "max_samples"},
    )


def too_many_classes(where: str, count: int, limits: DatasetLimits, detail: str = "") -> ResourceExhausted:
    return ResourceExhausted(
        f"{where} has {count} classes{detail}, more than max_classes (O2U_MAX_CLASSES) = "
        f"{limits.max_classes}",
        reason="TOO_MANY_CLASSES",
        metadata={"limit": "max_classes"},
    )


def too_much_decoded(what: str, size: int, limits: DatasetLimits) -> ResourceExhausted:
    return ResourceExhausted(
        f"{what} takes {size} bytes in memory, more than max_decoded_bytes (O2U_MAX_DECODED_BYTES) = "
        f"{limits.max_decoded_bytes}",
        reason="DATASET_TOO_LARGE",
        metadata={"limit": "max_decoded_bytes"},
    )


def _check_strings(values: Sequence[str], *, what: str, max_chars: int, uri: str) -> None:
    for index, value in enumerate(values):
        problem = text_problem(value, max_chars=max_chars)
        if problem is not None:
            raise invalid_dataset(f"{shown(uri)}: {what} {shown(value, 80)!r} (number {index}) {problem}")


def check_loaded(dataset: LoadedDataset, uri: str, limits: DatasetLimits) -> None:
    """The checks every format's result gets: sizes in memory, classes, keys and class names."""
    num_samples, num_classes = len(dataset.labels), len(dataset.class_names)
    if num_classes > limits.max_classes:
        raise too_many_classes(shown(uri), num_classes, limits)
    if dataset.features.nbytes > limits.max_decoded_bytes:
        raise too_much_decoded(f"{shown(uri)} (decoded)", dataset.features.nbytes, limits)
    per_class = STAGE_2_BYTES_PER_SAMPLE_CLASS * num_samples * num_classes
    if per_class > limits.max_decoded_bytes:
        raise too_much_decoded(
            f"{shown(uri)}: stage 2's per-class votes and probabilities for {num_samples} samples x "
            f"{num_classes} classes",
            per_class,
            limits,
        )
    _check_strings(dataset.class_names, what="class name", max_chars=MAX_CLASS_NAME_CHARS, uri=uri)
    _check_strings(dataset.keys, what="sample key", max_chars=MAX_KEY_CHARS, uri=uri)


def _update(digest: Any, array: np.ndarray[Any, Any], should_stop: Callable[[], None]) -> None:
    digest.update(repr((array.dtype.str, array.shape)).encode())
    if not array.flags.c_contiguous:
        # A Fortran-ordered array is hashed in its memory order (its transpose is C-ordered), so
        # neither needs a copy; anything else is copied.
        array = array.T if array.flags.f_contiguous else np.ascontiguousarray(array)
    flat = array.reshape(-1).view(np.uint8).data
    for start in range(0, len(flat), _DIGEST_CHUNK):
        should_stop()
        digest.update(flat[start : start + _DIGEST_CHUNK])


def content_digest(dataset: LoadedDataset, should_stop: Callable[[], None] = lambda: None) -> str:
    """SHA-256 of what the engine trains on: the samples, labels, keys and class names."""
    digest = hashlib.sha256()
    _update(digest, dataset.features, should_stop)
    _update(digest, np.ascontiguousarray(dataset.labels, dtype=np.int64), should_stop)
    for strings in (dataset.keys, dataset.class_names):
        digest.update(len(strings).to_bytes(8, "little"))
        for value in strings:
            encoded = value.encode("utf-8", "surrogatepass")
            digest.update(len(encoded).to_bytes(8, "little") + encoded)
    return digest.hexdigest()
