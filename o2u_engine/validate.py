"""Input validation, done once at the public entry point so everything after it can trust its inputs.

Every error is a DataValidationError that names the field (`features`, `labels`,
`num_classes`), the first offending sample index where one sample is at fault, and the expected
shape or range, so a person can find and fix the bad row without reading engine code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from o2u_engine.errors import DataValidationError
from o2u_engine.layout import SampleLayout, infer_layout
from o2u_engine.scan import SampleStats, check_finite, scan_samples

MIN_SAMPLES = 10  # below this the loss statistics say nothing
MAX_CLASSES = 100_000


@dataclass(frozen=True)
class ValidatedInputs:
    samples: np.ndarray  # (N, D) or images in the caller's layout; may be a memmap, never copied
    labels: np.ndarray  # (N,) int64 in [0, K)
    num_classes: int  # K
    layout: SampleLayout
    stats: SampleStats


def _as_array(features: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        tensor = features.detach().cpu()
        if tensor.dtype in (torch.bfloat16, torch.float16):
            tensor = tensor.float()
        return tensor.numpy()
    if not isinstance(features, np.ndarray):
        raise DataValidationError(
            f"features: expected a numpy array or torch tensor, got {type(features).__name__}",
            field="features",
        )
    return features


def _check_features(samples: np.ndarray) -> SampleLayout:
    kind = samples.dtype.kind
    if kind == "b" or kind not in "uif":
        raise DataValidationError(
            f"features: expected an integer or floating-point array, got dtype {samples.dtype}",
            field="features",
        )
    if samples.ndim not in (2, 3, 4):
        raise DataValidationError(
            "features: expected (N, D) feature vectors or images shaped (N, H, W), (N, H, W, C) or "
            f"(N, C, H, W), got an array of shape {samples.shape}",
            field="features",
        )
    if samples.shape[0] < MIN_SAMPLES:
        raise DataValidationError(
            f"features: expected at least {MIN_SAMPLES} samples, got {samples.shape[0]}", field="features"
        )
    return infer_layout(tuple(samples.shape[1:]))


def _first(mask: np.ndarray) -> int:
    return int(np.argmax(mask))


def _labels_to_int64(labels: np.ndarray | Sequence[int] | torch.Tensor) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    array = np.asarray(labels)
    if array.ndim != 1:
        raise DataValidationError(
            f"labels: expected a 1-D sequence of N integers, got shape {array.shape}", field="labels"
        )
    if array.dtype.kind == "b":
        raise DataValidationError(
            "labels: expected integer class indices, got booleans", field="labels", index=0
        )
    if array.dtype.kind in "US":
        raise DataValidationError(
            f"labels: expected integer class indices, got strings (index 0 is {array[0]!r}); "
            "map class names to 0..K-1 first",
            field="labels",
            index=0,
        )
    if array.dtype.kind == "O":
        for index, value in enumerate(array):
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise DataValidationError(
                    f"labels: value {value!r} at index {index} is not an integer class index",
                    field="labels",
                    index=index,
                )
        return array.astype(np.int64)
    if array.dtype.kind == "f":
        bad = ~np.isfinite(array) | (array != np.round(array))
        if bad.any():
            index = _first(bad)
            raise DataValidationError(
                f"labels: value {array[index].item()!r} at index {index} is not an integer class index",
                field="labels",
                index=index,
            )
        return array.astype(np.int64)
    if array.dtype.kind not in "ui":
        raise DataValidationError(f"labels: expected integers, got dtype {array.dtype}", field="labels")
    if array.dtype == np.uint64 and array.size and array.max() > np.iinfo(np.int64).max:
        index = _first(array > np.iinfo(np.int64).max)
        raise DataValidationError(
            f"labels: value at index {index} is out of range", field="labels", index=index
        )
    return array.astype(np.int64)


def validate_labels(
    labels: np.ndarray | Sequence[int] | torch.Tensor, *, num_samples: int, num_classes: int | None
) -> tuple[np.ndarray, int]:
    """Labels as int64 (N,) and the number of classes K; raises DataValidationError."""
    if num_classes is not None and (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, int)
        or not 2 <= num_classes <= MAX_CLASSES
    ):
        raise DataValidationError(
            f"num_classes: expected an integer in [2, {MAX_CLASSES}], got {num_classes!r}",
            field="num_classes",
        )
    array = _labels_to_int64(labels)
    if array.shape[0] != num_samples:
        raise DataValidationError(
            f"labels: expected {num_samples} labels (one per sample in features), got {array.shape[0]}",
            field="labels",
        )
    negative = array < 0
    if negative.any():
        index = _first(negative)
        upper = "K" if num_classes is None else str(num_classes)
        raise DataValidationError(
            f"labels: value {array[index]} at index {index} is outside [0, {upper})",
            field="labels",
            index=index,
        )
    if num_classes is None:
        num_classes = int(array.max()) + 1
        if num_classes > MAX_CLASSES:
            index = _first(array >= MAX_CLASSES)
            raise DataValidationError(
                f"labels: value {array[index]} at index {index} is outside [0, {MAX_CLASSES})",
                field="labels",
                index=index,
            )
    too_large = array >= num_classes
    if too_large.any():
        index = _first(too_large)
        raise DataValidationError(
            f"labels: value {array[index]} at index {index} is outside [0, {num_classes}) "
            f"for num_classes={num_classes}",
            field="labels",
            index=index,
        )
    present = np.unique(array)
    if present.size < 2:
        raise DataValidationError(
            f"labels: at least 2 classes must be present, found only class {int(present[0])}", field="labels"
        )
    return array, num_classes


def validate_inputs(
    features: np.ndarray | torch.Tensor,
    labels: np.ndarray | Sequence[int] | torch.Tensor,
    *,
    num_classes: int | None,
) -> ValidatedInputs:
    """Check shapes, dtypes, lengths, label range and finiteness; one pass over the samples."""
    samples = _as_array(features)
    layout = _check_features(samples)
    label_array, classes = validate_labels(labels, num_samples=samples.shape[0], num_classes=num_classes)
    stats = scan_samples(samples, layout)
    check_finite(stats)
    return ValidatedInputs(samples, label_array, classes, layout, stats)
