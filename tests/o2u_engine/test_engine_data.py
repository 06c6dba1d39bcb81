"""Data preparation: layouts, dtypes, resizing, memmaps, and resident == streamed batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from o2u_engine import prepare_features, prepare_images
from o2u_engine.data import PreparedData, held_out_count, split_batches, validation_split
from o2u_engine.layout import infer_layout
from o2u_engine.scan import scan_samples


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


def test_channels_last_images_are_used_in_place_and_give_the_copys_batches() -> None:
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, size=(40, 6, 6, 3), dtype=np.uint8)  # (N, H, W, C), as loaders decode
    layout = infer_layout(images.shape[1:])
    stats = scan_samples(images, layout)
    cpu = torch.device("cpu")
    data = PreparedData(
        images, layout, stats, image_size=6, device=cpu, placement="resident", chunk_samples=0
    )
    assert data.storage is not None
    assert data.storage.data_ptr() == images.ctypes.data  # no copy of the dataset
    assert data.storage.shape == (40, 3, 6, 6)
    copy = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    for batch in data.batches(order, 8):
        assert torch.equal(batch.stored, copy[batch.indices])
        assert torch.equal(data.normalize(batch.stored), (copy[batch.indices].float() - data.mean) / data.std)
    resized = PreparedData(
        images, layout, stats, image_size=4, device=cpu, placement="resident", chunk_samples=0
    )
    assert resized.storage is not None
    assert not np.shares_memory(resized.storage.numpy(), images)  # resized: a copy


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


def test_batches_cover_the_order_and_streamed_ones_are_copied_several_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = np.random.default_rng(3)
    samples = rng.integers(0, 256, size=(50, 8, 8, 3), dtype=np.uint8)
    layout = infer_layout(samples.shape[1:])
    stats = scan_samples(samples, layout)
    cpu = torch.device("cpu")
    resident = PreparedData(
        samples, layout, stats, image_size=8, device=cpu, placement="resident", chunk_samples=0
    )
    streamed = PreparedData(
        samples, layout, stats, image_size=8, device=cpu, placement="streamed", chunk_samples=20
    )
    copies: list[int] = []  # samples per host-to-device copy
    real_load = streamed.load

    def counting_load(indices: torch.Tensor) -> torch.Tensor:
        copies.append(indices.shape[0])
        return real_load(indices)

    monkeypatch.setattr(streamed, "load", counting_load)
    order = torch.randperm(50, generator=torch.Generator().manual_seed(1))
    from_resident, from_streamed = list(resident.batches(order, 8)), list(streamed.batches(order, 8))
    expected = [batch.tolist() for batch in split_batches(order, 8)]  # 7 near-equal batches: 8, then 7s
    assert [batch.indices.tolist() for batch in from_resident] == expected
    assert [batch.indices.tolist() for batch in from_streamed] == expected
    assert torch.cat([batch.indices for batch in from_streamed]).tolist() == order.tolist()
    for one, other in zip(from_resident, from_streamed, strict=True):
        assert torch.equal(one.stored, other.stored)
    assert copies == [15, 14, 14, 7]  # whole batches, up to 20 samples per copy


def test_split_batches_keep_two_samples_for_batch_norm() -> None:
    assert [len(batch) for batch in split_batches(torch.arange(10), 4)] == [4, 3, 3]
    assert [len(batch) for batch in split_batches(torch.arange(5), 1)] == [3, 2]
    assert [len(batch) for batch in split_batches(torch.arange(3), 2)] == [3]


@pytest.mark.parametrize(("num_samples", "fraction", "held_out"), [(100, 0.1, 10), (10, 0.0, 1), (3, 0.4, 1)])
def test_validation_split_is_seeded_sorted_and_never_empty(
    num_samples: int, fraction: float, held_out: int
) -> None:
    split = validation_split(num_samples, fraction, seed=5)
    assert held_out_count(num_samples, fraction) == split.held_out.shape[0] == held_out
    assert np.array_equal(np.sort(np.concatenate([split.train, split.held_out])), np.arange(num_samples))
    assert np.all(np.diff(split.train) > 0)
    assert np.all(np.diff(split.held_out) > 0)
    again = validation_split(num_samples, fraction, seed=5)
    assert np.array_equal(again.train, split.train)
    assert split.train.shape[0] >= 2
