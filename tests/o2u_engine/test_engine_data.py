"""Data preparation: layouts, dtypes, resizing, memmaps, and resident == streamed batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from o2u_engine import prepare_features, prepare_images
from o2u_engine.data import PreparedData, scan_samples
from o2u_engine.layout import infer_layout


def test_all_image_layouts_give_the_same_tensor() -> None:
    rng = np.random.default_rng(0)
    nchw = rng.integers(0, 256, size=(12, 3, 10, 10), dtype=np.uint8)
    nhwc = np.ascontiguousarray(nchw.transpose(0, 2, 3, 1))
    expected = torch.from_numpy(nchw)
    assert torch.equal(prepare_images(nchw), expected)
    assert torch.equal(prepare_images(nhwc), expected)
    gray = nchw[:, 0]
    assert torch.equal(prepare_images(gray), expected[:, :1])


@pytest.mark.parametrize(
    ("shape", "layout"),
    [
        ((8, 8), (1, 8, 8, False)),
        ((3, 32, 32), (3, 32, 32, False)),
        ((32, 32, 3), (3, 32, 32, True)),
        ((4, 4, 3), (3, 4, 4, True)),
        ((3, 4, 4), (3, 4, 4, False)),
        ((1, 28, 28), (1, 28, 28, False)),
    ],
)
def test_layout_rule(shape: tuple[int, ...], layout: tuple[int, int, int, bool]) -> None:
    read = infer_layout(shape)
    assert (read.channels, read.height, read.width, read.channels_last) == layout


def test_float_images_are_scaled_to_bytes_with_the_dataset_range() -> None:
    images = np.linspace(-1.0, 1.0, 12 * 4 * 4).reshape(12, 4, 4)
    prepared = prepare_images(images)
    assert prepared.dtype == torch.uint8
    assert int(prepared.min()) == 0
    assert int(prepared.max()) == 255
    digits_like = np.arange(17, dtype=np.float64).repeat(16).reshape(17, 4, 4)  # values 0..16
    assert sorted(set(prepare_images(digits_like).flatten().tolist())) == sorted(
        {round(v * 255 / 16) for v in range(17)}
    )


def test_images_are_resized_in_bulk() -> None:
    images = np.zeros((12, 64, 64), dtype=np.uint8)
    images[:, :32] = 200  # top half bright
    small = prepare_images(images, image_size=16)
    assert small.shape == (12, 1, 16, 16)
    assert int(small[0, 0, 2, 5]) == 200
    assert int(small[0, 0, 13, 5]) == 0


def test_features_are_float32_and_standardized_on_the_fly() -> None:
    features = np.random.default_rng(1).normal(5.0, 3.0, size=(500, 6))
    assert prepare_features(features).dtype == torch.float32
    layout = infer_layout((6,))
    stats = scan_samples(features, layout)
    np.testing.assert_allclose(stats.mean, features.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(stats.std, features.std(axis=0), rtol=1e-10)
    data = PreparedData(
        features,
        layout,
        stats,
        image_size=None,
        device=torch.device("cpu"),
        placement="resident",
        chunk_samples=0,
    )
    normalized = data.normalize(data.load(torch.arange(500)))
    torch.testing.assert_close(normalized.mean(0), torch.zeros(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(normalized.std(0, unbiased=False), torch.ones(6), atol=1e-5, rtol=0)


def test_constant_features_do_not_divide_by_zero() -> None:
    features = np.ones((20, 3), dtype=np.float32)
    stats = scan_samples(features, infer_layout((3,)))
    assert np.all(stats.std == 1.0)


def test_a_read_only_memmap_is_used_in_place_on_the_cpu(tmp_path: Path) -> None:
    path = tmp_path / "images.u8"
    writer = np.memmap(path, dtype=np.uint8, mode="w+", shape=(40, 1, 8, 8))
    writer[:] = np.arange(40 * 64).reshape(40, 1, 8, 8) % 251
    writer.flush()
    images = np.memmap(path, dtype=np.uint8, mode="r", shape=(40, 1, 8, 8))
    layout = infer_layout(images.shape[1:])
    stats = scan_samples(images, layout)
    data = PreparedData(
        images, layout, stats, image_size=8, device=torch.device("cpu"), placement="resident", chunk_samples=0
    )
    assert data.storage is not None
    assert data.storage.data_ptr() == images.ctypes.data  # no copy of the dataset


@pytest.mark.parametrize(
    ("shape", "dtype", "image_size"),
    [
        ((30, 12, 12, 3), np.uint8, 8),
        ((30, 9, 9), np.float64, 9),
        ((30, 1, 8, 8), np.uint8, 8),
        ((30, 5), np.float64, None),
    ],
)
def test_streamed_loads_equal_resident_loads(
    shape: tuple[int, ...], dtype: type, image_size: int | None
) -> None:
    rng = np.random.default_rng(2)
    samples: np.ndarray = (rng.random(shape) * 255).astype(dtype)
    layout = infer_layout(shape[1:])
    stats = scan_samples(samples, layout)
    cpu = torch.device("cpu")
    resident = PreparedData(
        samples, layout, stats, image_size=image_size, device=cpu, placement="resident", chunk_samples=0
    )
    streamed = PreparedData(
        samples, layout, stats, image_size=image_size, device=cpu, placement="streamed", chunk_samples=7
    )
    assert streamed.storage is None
    indices = torch.randperm(30, generator=torch.Generator().manual_seed(0))
    for part in torch.split(indices, 7):
        assert torch.equal(streamed.load(part), resident.load(part))
