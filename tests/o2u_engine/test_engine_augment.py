"""Batch crop + flip: shapes, reproducibility, and that windows really are shifted/mirrored copies."""

from __future__ import annotations

import torch

from o2u_engine.augment import crop_padding, random_crop_flip


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_shape_dtype_and_reproducibility() -> None:
    images = torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8)
    first = random_crop_flip(images, 2, generator(0))
    assert first.shape == images.shape
    assert first.dtype == torch.uint8
    assert torch.equal(first, random_crop_flip(images, 2, generator(0)))
    assert not torch.equal(first, random_crop_flip(images, 2, generator(1)))


def test_each_output_is_a_shifted_possibly_mirrored_window_of_its_input() -> None:
    images = torch.randint(1, 256, (32, 2, 6, 6), dtype=torch.uint8)  # no zeros: padding is visible
    padding = 2
    out = random_crop_flip(images, padding, generator(5))
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    for index in range(images.shape[0]):
        candidates = [
            window
            for dy in range(2 * padding + 1)
            for dx in range(2 * padding + 1)
            for window in (padded[index, :, dy : dy + 6, dx : dx + 6],)
            for window in (window, window.flip(-1))
        ]
        assert any(torch.equal(out[index], candidate) for candidate in candidates)


def test_flips_and_shifts_both_happen() -> None:
    images = torch.arange(36, dtype=torch.uint8).reshape(1, 1, 6, 6).repeat(64, 1, 1, 1)
    out = random_crop_flip(images, 0, generator(3))  # no padding: only flips remain
    mirrored = sum(torch.equal(o, images[0].flip(-1)) for o in out)
    assert 10 < mirrored < 54
    assert crop_padding(32) == 4
    assert crop_padding(8) == 1
