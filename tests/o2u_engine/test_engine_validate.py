"""Every input error names the field, the first offending index and the expected range."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from o2u_engine import DataValidationError, score_noise
from o2u_engine.validate import validate_inputs

GOOD_FEATURES = np.zeros((12, 4), dtype=np.float32)
GOOD_LABELS = np.arange(12) % 3


def features_with(index: int, value: float) -> np.ndarray:
    features = GOOD_FEATURES.copy()
    features[index, 2] = value
    return features


@pytest.mark.parametrize(
    ("features", "labels", "num_classes", "field", "index", "text"),
    [
        (
            GOOD_FEATURES,
            np.array([0, 1, 2, 1.5, 0, 1, 2, 0, 1, 2, 0, 1]),
            None,
            "labels",
            3,
            "1.5 at index 3",
        ),
        (GOOD_FEATURES, np.array([0, 1, 2, 3, np.nan, 1, 2, 0, 1, 2, 0, 1]), None, "labels", 4, "at index 4"),
        (GOOD_FEATURES, ["cat"] * 12, None, "labels", 0, "strings"),
        (GOOD_FEATURES, np.ones(12, dtype=bool), None, "labels", 0, "booleans"),
        (GOOD_FEATURES, [0, 1, "2", 0, 1, 2, 0, 1, 2, 0, 1, 2], None, "labels", 0, "strings"),
        (
            GOOD_FEATURES,
            np.array([0, 1, 2, 0, 1, None, 0, 1, 2, 0, 1, 2], dtype=object),
            None,
            "labels",
            5,
            "index 5",
        ),
        (GOOD_FEATURES, np.array([0, 1, 2, 0, -1, 2, 0, 1, 2, 0, 1, 2]), None, "labels", 4, "outside [0, K)"),
        (GOOD_FEATURES, np.array([0, 1, 2, 0, 1, 2, 0, 7, 2, 0, 1, 2]), 3, "labels", 7, "outside [0, 3)"),
        (GOOD_FEATURES, np.zeros(12, dtype=np.int64), None, "labels", None, "at least 2 classes"),
        (GOOD_FEATURES, np.arange(11) % 3, None, "labels", None, "expected 12 labels"),
        (GOOD_FEATURES, np.zeros((12, 2), dtype=np.int64), None, "labels", None, "1-D"),
        (GOOD_FEATURES, GOOD_LABELS, 1, "num_classes", None, "[2, 100000]"),
        (GOOD_FEATURES, GOOD_LABELS, 2.0, "num_classes", None, "[2, 100000]"),
        (features_with(6, np.nan), GOOD_LABELS, None, "features", 6, "index 6 contains NaN or infinity"),
        (features_with(9, np.inf), GOOD_LABELS, None, "features", 9, "index 9 contains NaN or infinity"),
        (np.zeros((5, 4), dtype=np.float32), GOOD_LABELS[:5], None, "features", None, "at least 10 samples"),
        (np.zeros(12, dtype=np.float32), GOOD_LABELS, None, "features", None, "(N, D) feature vectors"),
        (np.zeros((12, 2, 2, 2, 2)), GOOD_LABELS, None, "features", None, "(N, C, H, W)"),
        (np.zeros((12, 5, 6, 7)), GOOD_LABELS, None, "features", None, "C in (1, 3, 4)"),
        (np.zeros((12, 4), dtype=bool), GOOD_LABELS, None, "features", None, "dtype bool"),
        (np.zeros((12, 4), dtype=np.complex64), GOOD_LABELS, None, "features", None, "dtype complex64"),
        (np.array([["a"] * 4] * 12), GOOD_LABELS, None, "features", None, "integer or floating-point"),
        ([[0.0] * 4] * 12, GOOD_LABELS, None, "features", None, "numpy array or torch tensor"),
    ],
)
def test_validation_errors_are_specific(
    features: Any, labels: Any, num_classes: Any, field: str, index: int | None, text: str
) -> None:
    with pytest.raises(DataValidationError) as raised:
        score_noise(features, labels, num_classes=num_classes)
    error = raised.value
    assert error.field == field
    assert error.index == index
    assert str(error).startswith(f"{field}: ")
    assert text in str(error)


def test_float_labels_with_integral_values_and_tensors_are_accepted() -> None:
    inputs = validate_inputs(
        torch.zeros(12, 4), torch.tensor(GOOD_LABELS, dtype=torch.float64), num_classes=5
    )
    assert inputs.labels.dtype == np.int64
    assert inputs.num_classes == 5
    assert inputs.layout.kind == "features"
    as_list = validate_inputs(GOOD_FEATURES, [int(v) for v in GOOD_LABELS], num_classes=None)
    assert as_list.num_classes == 3


def test_bfloat16_tensors_are_read_as_float32() -> None:
    inputs = validate_inputs(torch.ones(12, 3, 8, 8, dtype=torch.bfloat16), GOOD_LABELS, num_classes=None)
    assert inputs.samples.dtype == np.float32
    assert (inputs.layout.channels, inputs.layout.height) == (3, 8)
