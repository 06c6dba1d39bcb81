"""How a sample array is laid out: feature vectors or images, and where the channels are.

The engine accepts `(N, D)` feature vectors and images as `(N, H, W)`, `(N, H, W, C)` or
`(N, C, H, W)` with C in {1, 3, 4}. Both configuration resolution and data preparation need to
read the layout from the per-sample shape alone, so the rule lives here, once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from o2u_engine.errors import DataValidationError

CHANNEL_COUNTS = (1, 3, 4)


@dataclass(frozen=True)
class SampleLayout:
    """The layout of one sample: `(D,)` features or a `channels x height x width` image."""

    kind: Literal["features", "images"]
    feature_dim: int = 0  # D, features only
    channels: int = 0  # C, images only
    height: int = 0  # pixels
    width: int = 0  # pixels
    channels_last: bool = False  # stored as (H, W, C)

    @property
    def is_images(self) -> bool:
        return self.kind == "images"

    @property
    def side(self) -> int:
        """The longer image side, in pixels (the quantity image_size defaults are based on)."""
        return max(self.height, self.width)


def infer_layout(sample_shape: tuple[int, ...]) -> SampleLayout:
    """Read the layout from the shape of one sample (the array shape without N).

    For 3-D samples the channels axis is the last one when its size is 1, 3 or 4, else the first.
    When both ends could be channels, channels-last wins unless only the channels-first reading
    gives a square image, e.g. `(3, 32, 32)`.
    """
    if any(size < 1 for size in sample_shape):
        raise DataValidationError(
            f"features: every dimension of a sample must be >= 1, got sample shape {sample_shape}",
            field="features",
        )
    if len(sample_shape) == 1:
        return SampleLayout(kind="features", feature_dim=sample_shape[0])
    if len(sample_shape) == 2:
        height, width = sample_shape
        return SampleLayout(kind="images", channels=1, height=height, width=width)
    if len(sample_shape) == 3:
        first, middle, last = sample_shape
        last_is_channels = last in CHANNEL_COUNTS
        first_is_channels = first in CHANNEL_COUNTS
        if first_is_channels and (not last_is_channels or (middle == last and first != middle)):
            return SampleLayout(kind="images", channels=first, height=middle, width=last)
        if last_is_channels:
            return SampleLayout(kind="images", channels=last, height=first, width=middle, channels_last=True)
    raise DataValidationError(
        "features: expected (N, D) feature vectors or images shaped (N, H, W), (N, H, W, C) or "
        f"(N, C, H, W) with C in {CHANNEL_COUNTS}, got per-sample shape {sample_shape}",
        field="features",
    )
