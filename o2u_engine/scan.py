"""One sequential, chunked pass over the raw samples: the normalization constants and the first
non-finite value.

Validation needs the first sample holding NaN or infinity and data preparation needs the per
channel (or per feature) mean and standard deviation; one scan finds both, so a memory-mapped
array is read front to back once and never copied whole. Chunks have a fixed size in bytes, so
the figures never depend on the machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from o2u_engine.errors import DataValidationError
from o2u_engine.layout import SampleLayout

SCAN_CHUNK_BYTES = 4 * 2**20  # raw input bytes per scan chunk; fixed, so statistics never vary


@dataclass(frozen=True)
class SampleStats:
    """What one pass over the raw samples found (values in the input's own units)."""

    first_nonfinite: int | None  # index of the first sample holding NaN or infinity
    minimum: float
    maximum: float
    mean: np.ndarray  # (D,) per feature or (C,) per channel, float64
    std: np.ndarray  # same shape; 1 where a feature or channel is constant


def chunk_ranges(num_samples: int, sample_bytes: int, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    """(start, stop) sample ranges of about `chunk_bytes` each (at least one sample)."""
    step = max(1, chunk_bytes // max(1, sample_bytes))
    for start in range(0, num_samples, step):
        yield start, min(num_samples, start + step)


def _reduce_axes(layout: SampleLayout, ndim: int) -> tuple[int, ...]:
    """Axes averaged over for the normalization constants: all but features/channels."""
    if not layout.is_images:
        return (0,)
    if ndim == 3:
        return (0, 1, 2)
    return (0, 1, 2) if layout.channels_last else (0, 2, 3)


def scan_samples(samples: np.ndarray, layout: SampleLayout) -> SampleStats:
    """One sequential, chunked pass: first non-finite sample, min, max and per-group mean/std.

    Means and variances of chunks are merged with Chan's parallel update in float64.
    """
    axes = _reduce_axes(layout, samples.ndim)
    groups = layout.feature_dim if not layout.is_images else layout.channels
    count = 0.0
    mean = np.zeros(groups)
    m2 = np.zeros(groups)
    minimum, maximum = np.inf, -np.inf
    is_float = np.issubdtype(samples.dtype, np.floating)
    sample_bytes = int(np.prod(samples.shape[1:])) * samples.dtype.itemsize
    for start, stop in chunk_ranges(samples.shape[0], sample_bytes, SCAN_CHUNK_BYTES):
        chunk = np.asarray(samples[start:stop])
        if is_float:
            finite = np.isfinite(chunk).reshape(stop - start, -1).all(axis=1)
            if not finite.all():
                first = start + int(np.argmin(finite))
                return SampleStats(first, np.nan, np.nan, mean, np.ones(groups))
        minimum = min(minimum, float(chunk.min()))
        maximum = max(maximum, float(chunk.max()))
        chunk_count = chunk.size / groups
        chunk_sum = chunk.sum(axis=axes, dtype=np.float64).reshape(groups)
        chunk_sumsq = np.square(chunk, dtype=np.float64).sum(axis=axes).reshape(groups)
        chunk_mean = chunk_sum / chunk_count
        chunk_m2 = np.maximum(chunk_sumsq - chunk_sum * chunk_mean, 0.0)
        total = count + chunk_count
        delta = chunk_mean - mean
        mean = mean + delta * (chunk_count / total)
        m2 = m2 + chunk_m2 + delta**2 * (count * chunk_count / total)
        count = total
    std = np.sqrt(m2 / max(count, 1.0))
    std[std <= 1e-12 * max(1.0, abs(maximum), abs(minimum))] = 1.0
    return SampleStats(None, minimum, maximum, mean, std)


def check_finite(stats: SampleStats) -> None:
    """Raise DataValidationError naming the first sample with a NaN or infinite value."""
    if stats.first_nonfinite is not None:
        raise DataValidationError(
            f"features: sample at index {stats.first_nonfinite} contains NaN or infinity; "
            "expected finite values",
            field="features",
            index=stats.first_nonfinite,
        )
