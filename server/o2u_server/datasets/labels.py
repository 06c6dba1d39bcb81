"""Turning given labels into class indices.

Labels arrive as integers or as strings. Integer labels are kept: K = max + 1 classes named "0".."K-1"
(or the names given alongside them). String labels become indices into their sorted unique values,
which are the class names. K is checked against `max_classes` before any list of K names is built,
so a label of 2**63 costs nothing. Errors name the dataset and the first offending index.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from o2u_server.datasets.dataset import (
    MAX_CLASS_NAME_CHARS,
    DatasetLimits,
    invalid_dataset,
    too_many_classes,
)
from o2u_server.text import shown, text_problem

__all__ = ["encode_labels"]


def encode_labels(
    labels: np.ndarray[Any, Any] | Sequence[int] | Sequence[str],
    *,
    class_names: Sequence[str] | None,
    where: str,
    limits: DatasetLimits,
) -> tuple[np.ndarray[Any, np.dtype[np.int64]], list[str]]:
    """(labels as int64 in [0, K), the K class names); `where` names the dataset in errors.

    ResourceExhausted (TOO_MANY_CLASSES) when K would exceed `limits.max_classes`."""
    if class_names is not None and len(class_names) > limits.max_classes:
        raise too_many_classes(where, len(class_names), limits, " (in class_names)")
    if class_names is not None and len(set(class_names)) < len(class_names):
        repeated = next(name for i, name in enumerate(class_names) if name in class_names[:i])
        raise invalid_dataset(f"{where}: class_names lists {shown(repeated, 80)!r} more than once")
    if not isinstance(labels, np.ndarray) and labels and all(isinstance(label, str) for label in labels):
        # Not through a fixed-width NumPy array: one long label would make every row that wide.
        return _string_label_list(labels, class_names=class_names, where=where, limits=limits)  # type: ignore[arg-type]
    values = np.asarray(labels)
    if values.ndim != 1:
        raise invalid_dataset(f"{where}: labels must be one-dimensional, got shape {values.shape}")
    if values.dtype.kind == "S":
        try:
            values = np.char.decode(values, "utf-8")
        except UnicodeDecodeError as error:
            raise invalid_dataset(f"{where}: byte-string labels are not UTF-8: {error}") from error
    if values.dtype.kind in "iu":
        return _integer_labels(values, class_names=class_names, where=where, limits=limits)
    if values.dtype.kind == "U":
        return _string_labels(values, class_names=class_names, where=where, limits=limits)
    raise invalid_dataset(f"{where}: labels must be integers or strings, got dtype {values.dtype}")


def _integer_labels(
    values: np.ndarray[Any, Any], *, class_names: Sequence[str] | None, where: str, limits: DatasetLimits
) -> tuple[np.ndarray[Any, np.dtype[np.int64]], list[str]]:
    if values.size and int(values.min()) < 0:
        index = int(np.argmax(values < 0))
        raise invalid_dataset(
            f"{where}: label {int(values[index])} at index {index} is negative; labels are 0..K-1"
        )
    top = int(values.max()) if values.size else -1
    if class_names is None:
        if top + 1 > limits.max_classes:
            index = int(np.argmax(values == values.max()))
            raise too_many_classes(
                where,
                top + 1,
                limits,
                f" (label {top} at index {index}; integer labels are class indices 0..K-1, so K is "
                "the largest label + 1)",
            )
        names = [str(i) for i in range(top + 1)]
    else:
        names = list(class_names)
        if top >= len(names):
            index = int(np.argmax(values >= len(names)))
            raise invalid_dataset(
                f"{where}: label {int(values[index])} at index {index} has no class name "
                f"({len(names)} class_names given, so labels must be 0..{len(names) - 1})"
            )
    return values.astype(np.int64), names


def _string_label_list(
    labels: Sequence[str], *, class_names: Sequence[str] | None, where: str, limits: DatasetLimits
) -> tuple[np.ndarray[Any, np.dtype[np.int64]], list[str]]:
    """String labels from a list (a manifest's or Parquet column's), each distinct one checked as a
    class name as soon as it is seen, and counted against max_classes."""
    if class_names is not None:
        return _string_labels(
            np.asarray(labels, dtype=object), class_names=class_names, where=where, limits=limits
        )
    first_seen: dict[str, int] = {}
    for index, label in enumerate(labels):
        if label in first_seen:
            continue
        problem = text_problem(label, max_chars=MAX_CLASS_NAME_CHARS)
        if problem is not None:
            raise invalid_dataset(f"{where}: label {shown(label, 80)!r} at index {index} {problem}")
        first_seen[label] = len(first_seen)
        if len(first_seen) > limits.max_classes:
            raise too_many_classes(where, len(first_seen), limits, " (distinct labels)")
    names = sorted(first_seen)  # by code point, as np.unique orders them
    rank_of_first = np.empty(len(names), dtype=np.int64)
    for rank, name in enumerate(names):
        rank_of_first[first_seen[name]] = rank
    order = np.fromiter((first_seen[label] for label in labels), dtype=np.int64, count=len(labels))
    return rank_of_first[order], names


def _string_labels(
    values: np.ndarray[Any, Any], *, class_names: Sequence[str] | None, where: str, limits: DatasetLimits
) -> tuple[np.ndarray[Any, np.dtype[np.int64]], list[str]]:
    if class_names is None:
        names, inverse = np.unique(values, return_inverse=True)
        if len(names) > limits.max_classes:
            raise too_many_classes(where, len(names), limits, " (distinct labels)")
        return inverse.astype(np.int64).reshape(-1), [str(name) for name in names]
    index_of = {name: i for i, name in enumerate(class_names)}
    encoded = np.empty(len(values), dtype=np.int64)
    for i, value in enumerate(values.tolist()):
        if value not in index_of:
            raise invalid_dataset(
                f"{where}: label {shown(str(value), 80)!r} at index {i} is not one of the given class_names"
            )
        encoded[i] = index_of[value]
    return encoded, list(class_names)
