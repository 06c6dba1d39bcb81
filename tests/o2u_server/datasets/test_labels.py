"""Label encoding: string labels from a list become indices into their sorted distinct values
without a fixed-width array (one long label would make every row that wide), and every distinct
label is checked as a class name as soon as it is seen."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from o2u_server.datasets.labels import encode_labels
from o2u_server.errors import InvalidArgument, ResourceExhausted
from tests.o2u_server.dataset_files import LIMITS


def test_string_labels_become_indices_into_their_sorted_names() -> None:
    labels, names = encode_labels(["b", "a", "é", "b", "A"], class_names=None, where="d", limits=LIMITS)
    expected_names, expected = np.unique(np.array(["b", "a", "é", "b", "A"]), return_inverse=True)
    assert names == list(expected_names) == ["A", "a", "b", "é"]
    assert labels.tolist() == expected.tolist() == [2, 1, 3, 2, 0]
    assert labels.dtype == np.int64


def test_one_long_label_is_refused_before_anything_row_wide_is_built() -> None:
    """20,000 rows and one label of 400,000 characters: a fixed-width array took 32 GB."""
    labels = ["a"] * 20_000
    labels[7_000] = "x" * 400_000
    tracemalloc.start()
    try:
        with pytest.raises(InvalidArgument, match="at index 7000 is 400000 characters long, more than 256"):
            encode_labels(labels, class_names=None, where="d", limits=LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10 * 1024 * 1024


def test_a_label_with_a_control_character_is_refused() -> None:
    with pytest.raises(
        InvalidArgument, match=r"label 'ca\\x1bt' at index 1 holds the control character U\+001B"
    ):
        encode_labels(["dog", "ca\x1bt"], class_names=None, where="d", limits=LIMITS)


def test_distinct_labels_are_counted_as_they_are_seen() -> None:
    labels = [f"class-{i}" for i in range(LIMITS.max_classes + 5)]
    with pytest.raises(ResourceExhausted, match="distinct labels"):
        encode_labels(labels, class_names=None, where="d", limits=LIMITS)


def test_repeated_class_names_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="class_names lists 'zero' more than once"):
        encode_labels(np.array([0, 1, 2]), class_names=["zero", "zero", "one"], where="d", limits=LIMITS)
