"""Batch crop + flip: shapes, reproducibility, that windows really are shifted/mirrored copies, and
that the default augmentation never mirrors (crop_flip runs only when asked for)."""

from __future__ import annotations

import numpy as np
import torch

import o2u_engine
import o2u_engine.train as trainer_module
from o2u_engine import O2UConfig, resolve_config
from o2u_engine.augment import augment_batch, crop_padding, random_crop_flip


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


def test_crop_never_mirrors_and_none_is_the_identity() -> None:
    images = torch.arange(36, dtype=torch.uint8).reshape(1, 1, 6, 6).repeat(64, 1, 1, 1)
    cropped = augment_batch(images, "crop", 0, generator(3))  # no padding: a crop is the image itself
    assert all(torch.equal(o, images[0]) for o in cropped)
    assert augment_batch(images, "none", 2, generator(3)) is images
    flipped = augment_batch(images, "crop_flip", 0, generator(3))
    assert any(torch.equal(o, images[0].flip(-1)) for o in flipped)


def test_default_augmentation_for_images_preserves_the_class_and_flips_only_when_asked() -> None:
    def resolved(config: O2UConfig, shape: tuple[int, ...]) -> str:
        return resolve_config(
            config, num_samples=500, sample_shape=shape, num_classes=3, device="cpu"
        ).augment

    assert resolved(O2UConfig(), (32, 32, 3)) == "none"
    assert resolved(O2UConfig(), (8, 8)) == "crop"  # small images: a shifted window, never mirrored
    assert resolved(O2UConfig(), (64,)) == "none"  # feature vectors
    assert resolved(O2UConfig(augment=True), (32, 32, 3)) == "crop"  # the legacy switch: no flip
    assert resolved(O2UConfig(augment=False), (8, 8)) == "none"
    assert resolved(O2UConfig(augment="crop_flip"), (32, 32, 3)) == "crop_flip"
    for shape in ((32, 32, 3), (8, 8), (3, 16, 16), (64,)):
        assert resolved(O2UConfig(), shape) != "crop_flip"


def test_a_default_run_never_mirrors_a_training_image() -> None:
    """Train on one asymmetric image: with the default augmentation every batch the network sees
    is the image itself or a shifted window of it, never its mirror."""
    images = np.zeros((40, 8, 8), dtype=np.uint8)
    images[:, 2:6, 1] = 255  # a bar at the left edge: its mirror is at the right
    labels = np.arange(40) % 2
    seen: list[torch.Tensor] = []
    original = trainer_module.augment_batch

    def spy(batch: torch.Tensor, augmentation: str, padding: int, gen: torch.Generator) -> torch.Tensor:
        out = original(batch, augmentation, padding, gen)
        seen.append(out)
        return out

    trainer_module.augment_batch = spy
    try:
        report = o2u_engine.score_noise(
            images, labels, config=O2UConfig(pretrain_epochs=1, cycle_length_epochs=1, num_cycles=1)
        )
    finally:
        trainer_module.augment_batch = original
    assert report.config.augment == "crop"
    assert seen
    for batch in seen:
        columns = batch.float().sum(dim=(0, 1, 2))  # (W,) ink per column
        assert columns[:4].sum() > 0  # the bar stays on the left half
        assert columns[5:].sum() == 0
