"""Turning sample arrays into model-ready batches on the device, resident or streamed.

Images are stored as uint8 `(N, C, S, S)` (a quarter of float32's memory; 8 bits is the native
precision of almost every image) and normalized per channel on the fly; feature vectors as
float32 `(N, D)`, standardized per dimension on the fly, with the constants of `scan_samples`.

Two placements give identical batches: *resident* (the prepared dataset is one device tensor and
a batch is a gather) and *streamed* (for data larger than device memory: each group of batches is
gathered from host memory, converted, and copied to the device through pinned memory on CUDA).
Conversion is per sample (layout, min-max scaling of non-uint8 images to 0..255, bilinear
antialiased resize to `image_size`), so it does not matter which samples share a chunk. An
epoch's order becomes near-equal batches (`split_batches`); stage 3's seeded hold-out split
(`validation_split`) is here too, since it is a fact of the data, not of a model.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from o2u_engine.layout import SampleLayout, infer_layout
from o2u_engine.scan import SampleStats, check_finite, chunk_ranges, scan_samples

BUILD_CHUNK_BYTES = 64 * 2**20  # raw input bytes converted at a time when building the resident tensor


@dataclass(frozen=True)
class Batch:
    """The samples of one optimizer step and their stored rows on the device."""

    indices: torch.Tensor  # (B,) int64 sample indices
    stored: torch.Tensor  # (B, C, S, S) uint8 images or (B, D) float32 features


def split_batches(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Near-equal batches of at most `batch_size` and at least 2 samples (BatchNorm needs 2)."""
    count = -(-order.shape[0] // batch_size)
    if order.shape[0] < 2 * count:
        count = max(1, order.shape[0] // 2)
    return list(order.tensor_split(count))


def _copy_groups(batches: list[torch.Tensor], max_samples: int) -> Iterator[list[torch.Tensor]]:
    """Consecutive batches loaded with one copy: as many as `max_samples` holds, at least one."""
    group: list[torch.Tensor] = []
    group_samples = 0
    for batch in batches:
        if group and group_samples + batch.shape[0] > max_samples:
            yield group
            group, group_samples = [], 0
        group.append(batch)
        group_samples += batch.shape[0]
    if group:
        yield group


@dataclass(frozen=True)
class ValidationSplit:
    """Stage 3's seeded split of the sample indices; both sorted, neither empty."""

    train: np.ndarray  # (N - H,) int64
    held_out: np.ndarray  # (H,) int64


def held_out_count(num_samples: int, fraction: float) -> int:
    """H, the samples stage 3 holds out: `fraction` of N, at least 1, leaving at least 2."""
    return min(num_samples - 2, max(1, round(fraction * num_samples)))


def validation_split(num_samples: int, fraction: float, seed: int) -> ValidationSplit:
    """The split of `num_samples` holding out `fraction` of them, drawn from `seed`."""
    permutation = np.random.default_rng(seed).permutation(num_samples)
    held_out = held_out_count(num_samples, fraction)
    return ValidationSplit(train=np.sort(permutation[held_out:]), held_out=np.sort(permutation[:held_out]))


class PreparedData:
    """The samples as the trainer sees them: `batches(order, batch_size)` gives what to train on,
    `load(indices)` stored rows on the device (uint8 images or float32 features), and `normalize`
    turns a (possibly augmented) batch into the model's float32 input."""

    def __init__(
        self,
        samples: np.ndarray,
        layout: SampleLayout,
        stats: SampleStats,
        *,
        image_size: int | None,
        device: torch.device,
        placement: str,
        chunk_samples: int,
        channels_last: bool = False,
    ) -> None:
        self.samples = samples
        self.layout = layout
        self.device = device
        self.image_size = image_size
        self.num_samples = samples.shape[0]
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self._scale_to_bytes = layout.is_images and samples.dtype != np.uint8
        spread = stats.maximum - stats.minimum
        self._low = stats.minimum
        self._scale = 255.0 / spread if spread > 0 else 0.0
        mean, std = stats.mean, stats.std
        if self._scale_to_bytes:  # constants in the 0..255 units the images are stored in
            mean, std = (mean - self._low) * self._scale, std * self._scale
        shape = (1, -1, 1, 1) if layout.is_images else (1, -1)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).reshape(shape)
        self.std = torch.tensor(np.where(std > 0, std, 1.0), dtype=torch.float32, device=device).reshape(
            shape
        )
        self.streamed = placement == "streamed"
        self.chunk_samples = chunk_samples if self.streamed else 0  # 0: load batch by batch
        self.storage = None if self.streamed else self._build_resident()

    @property
    def _resizes(self) -> bool:
        return self.layout.is_images and (self.layout.height, self.layout.width) != (self.image_size,) * 2

    def _storage_dtype(self) -> torch.dtype:
        return torch.uint8 if self.layout.is_images else torch.float32

    def convert(self, raw: np.ndarray) -> torch.Tensor:
        """Raw rows (n, ...) on the host -> stored rows on the device, (n, C, S, S) uint8 or (n, D)."""
        host_dtype = torch.uint8 if raw.dtype == np.uint8 and self.layout.is_images else torch.float32
        pin = self.device.type == "cuda"
        host = torch.empty(raw.shape, dtype=host_dtype, pin_memory=pin)
        np.copyto(host.numpy(), raw, casting="unsafe")  # the one host copy; float64 -> float32 here
        x = host.to(self.device, non_blocking=pin)
        if not self.layout.is_images:
            return x  # (n, D)
        if x.ndim == 3:
            x = x.unsqueeze(1)  # (n, 1, H, W)
        elif self.layout.channels_last:
            x = x.permute(0, 3, 1, 2)  # (n, H, W, C) -> (n, C, H, W)
        if not (self._scale_to_bytes or self._resizes):
            return x.contiguous()
        x = x.float()
        if self._scale_to_bytes:
            x = (x - self._low) * self._scale
        if self._resizes:
            assert self.image_size is not None
            size = (self.image_size, self.image_size)
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        return x.round_().clamp_(0, 255).to(torch.uint8).contiguous()  # (n, C, S, S)

    def _alias(self) -> torch.Tensor | None:
        """The input itself, when it already holds the stored values on the CPU: no copy at all.

        uint8 images at their own size qualify in any layout: `(N, H, W, C)`, as the loaders
        decode them, becomes a `(N, C, H, W)` view with channels-last strides, whose gathered
        batches hold the same values as a contiguous copy's.
        """
        raw = self.samples
        if self.device.type != "cpu" or not raw.flags.c_contiguous or self._resizes or self._scale_to_bytes:
            return None
        if (raw.dtype != np.uint8) if self.layout.is_images else (raw.dtype != np.float32):
            return None
        with warnings.catch_warnings():  # read-only memmaps: the engine never writes to its input
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(raw)
        if tensor.ndim == 3:
            return tensor.unsqueeze(1)  # (N, H, W) -> (N, 1, H, W)
        return tensor.permute(0, 3, 1, 2) if self.layout.channels_last else tensor

    def _build_resident(self) -> torch.Tensor:
        aliased = self._alias()
        if aliased is not None:
            return aliased
        layout = self.layout
        if layout.is_images:
            assert self.image_size is not None
            shape: tuple[int, ...] = (self.num_samples, layout.channels, self.image_size, self.image_size)
        else:
            shape = (self.num_samples, layout.feature_dim)
        storage = torch.empty(shape, dtype=self._storage_dtype(), device=self.device)
        sample_bytes = int(np.prod(self.samples.shape[1:])) * self.samples.dtype.itemsize
        for start, stop in chunk_ranges(self.num_samples, sample_bytes, BUILD_CHUNK_BYTES):
            storage[start:stop] = self.convert(np.asarray(self.samples[start:stop]))
        return storage

    def load(self, indices: torch.Tensor) -> torch.Tensor:
        """Stored rows for `indices` (a device tensor), in that order."""
        if self.storage is not None:
            return self.storage[indices]
        wanted = indices.cpu().numpy()
        order = np.argsort(wanted, kind="stable")  # read a memmap front to back
        raw = np.empty((len(wanted), *self.samples.shape[1:]), dtype=self.samples.dtype)
        raw[order] = self.samples[wanted[order]]
        return self.convert(raw)

    def batches(self, order: torch.Tensor, batch_size: int) -> Iterator[Batch]:
        """The samples of `order` (n,) in order, as near-equal batches of at most `batch_size`.

        Resident rows are gathered batch by batch; streamed ones are converted and copied for
        several batches at once (up to `chunk_samples`), which gives the same rows.
        """
        for group in _copy_groups(split_batches(order, batch_size), self.chunk_samples):
            stored = self.load(group[0] if len(group) == 1 else torch.cat(group))
            rows = torch.split(stored, [batch.shape[0] for batch in group])
            for indices, batch_rows in zip(group, rows, strict=True):
                yield Batch(indices, batch_rows)

    def normalize(self, stored: torch.Tensor) -> torch.Tensor:
        """Stored rows -> float32 model input: (x - mean) / std per channel or feature."""
        x = (stored.float() - self.mean) / self.std
        return x.contiguous(memory_format=self.memory_format) if x.ndim == 4 else x


def prepare_images(
    images: np.ndarray, *, image_size: int | None = None, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Images in any accepted layout and dtype -> the engine's uint8 `(N, C, S, S)` device tensor.

    `image_size` defaults to the longer input side. Raises DataValidationError (via the layout
    and the scan) for shapes it cannot read or non-finite pixels.
    """
    layout = infer_layout(tuple(images.shape[1:]))
    if not layout.is_images:
        raise ValueError(f"prepare_images: expected images, got per-sample shape {images.shape[1:]}")
    return _resident(images, layout, image_size or layout.side, device)


def prepare_features(features: np.ndarray, *, device: str | torch.device = "cpu") -> torch.Tensor:
    """Feature vectors `(N, D)` -> a float32 `(N, D)` device tensor (not yet standardized)."""
    layout = infer_layout(tuple(features.shape[1:]))
    if layout.is_images:
        raise ValueError(f"prepare_features: expected (N, D) features, got shape {features.shape}")
    return _resident(features, layout, None, device)


def _resident(
    samples: np.ndarray, layout: SampleLayout, image_size: int | None, device: str | torch.device
) -> torch.Tensor:
    """Checked, prepared samples as one resident device tensor."""
    stats = scan_samples(samples, layout)
    check_finite(stats)
    prepared = PreparedData(
        samples,
        layout,
        stats,
        image_size=image_size,
        device=torch.device(device),
        placement="resident",
        chunk_samples=0,
    )
    assert prepared.storage is not None
    return prepared.storage
