"""What every dataset format shares: the limits a loader checks, the arrays it returns, and the
errors that name the dataset, the limit and its setting."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from o2u_server.errors import InvalidArgument, ResourceExhausted
from o2u_server.settings import Settings
from o2u_server.storage import Storage

__all__ = [
    "DatasetLimits",
    "LoadedDataset",
    "Loader",
    "empty_dataset",
    "invalid_dataset",
    "too_large",
    "too_many_samples",
]


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


# A format's loader: (uri, storage, limits, field) -> the dataset, every limit checked as early as
# the information exists. `field` names the request field in errors ("dataset.uri").
Loader = Callable[[str, Storage, DatasetLimits, str], LoadedDataset]


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
