"""CUDA behaviour (skipped without a GPU): the device defaults, pinned streaming and resuming."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from o2u_engine import Cancelled, score_noise
from tests.o2u_engine.engine_testing import FAST, NoisyDataset, flip_labels

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def color_images() -> NoisyDataset:
    """600 RGB 32x32 images: 3 classes of colored stripes over noise, 10% of labels flipped."""
    rng = np.random.default_rng(4)
    true_labels = np.arange(600) % 3
    images = rng.integers(0, 80, size=(600, 32, 32, 3))
    for index, label in enumerate(true_labels):
        start = int(rng.integers(0, 24))
        if label == 0:
            images[index, start : start + 8, :, 0] += 170
        elif label == 1:
            images[index, :, start : start + 8, 1] += 170
        else:
            images[index, np.arange(32), np.arange(32), 2] += 170
    samples = np.clip(images, 0, 255).astype(np.uint8)
    return NoisyDataset(samples, flip_labels(true_labels, 3, 0.1, seed=5), true_labels, 3)


def test_cuda_defaults_train_cnn9_in_bf16(color_images: NoisyDataset) -> None:
    report = score_noise(color_images.samples, color_images.labels, config=FAST, device="cuda")
    assert report.device.startswith("cuda:")
    assert (report.config.model, report.config.precision, report.config.image_size) == ("cnn9", "bf16", 32)
    assert np.all(np.isfinite(report.noise_scores))
    k = int(color_images.is_noisy.sum())
    assert color_images.is_noisy[report.order()[:k]].mean() >= 0.6


def test_cuda_streamed_matches_resident(color_images: NoisyDataset, blobs: NoisyDataset) -> None:
    features = dataclasses.replace(FAST, precision="fp32")
    resident = score_noise(blobs.samples, blobs.labels, config=features, device="cuda")
    streamed_config = dataclasses.replace(features, data_placement="streamed", stream_chunk_samples=40)
    streamed = score_noise(blobs.samples, blobs.labels, config=streamed_config, device="cuda")
    np.testing.assert_allclose(streamed.noise_scores, resident.noise_scores, rtol=0, atol=1e-5)
    # Convolutions may pick non-deterministic kernels on the GPU: compare rankings, not bits.
    images = dataclasses.replace(FAST, model="small_cnn")
    first = score_noise(color_images.samples, color_images.labels, config=images, device="cuda")
    second = score_noise(
        color_images.samples,
        color_images.labels,
        config=dataclasses.replace(images, data_placement="streamed", stream_chunk_samples=100),
        device="cuda",
    )
    correlation = np.corrcoef(
        np.argsort(np.argsort(first.noise_scores)), np.argsort(np.argsort(second.noise_scores))
    )
    assert correlation[0, 1] > 0.9


def test_cuda_resume_continues_the_run(blobs: NoisyDataset, tmp_path: Path) -> None:
    config = dataclasses.replace(FAST, precision="fp32")
    uninterrupted = score_noise(blobs.samples, blobs.labels, config=config, device="cuda")
    polls = iter(range(1000))
    path = tmp_path / "cuda.ckpt"
    with pytest.raises(Cancelled):
        score_noise(
            blobs.samples, blobs.labels, config=config, device="cuda", checkpoint_path=path,
            should_cancel=lambda: next(polls) >= 40,
        )  # fmt: skip
    resumed = score_noise(blobs.samples, blobs.labels, config=config, device="cuda", checkpoint_path=path)
    np.testing.assert_allclose(resumed.noise_scores, uninterrupted.noise_scores, rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("ignore:TensorFloat32 tensor cores:UserWarning")  # inductor's advice for fp32
@pytest.mark.parametrize(
    ("precision", "mode"),
    [("fp32", "default"), ("bf16", "reduce-overhead")],  # the second replays each step as a CUDA graph
)
def test_cuda_compiled_model_scores_like_the_eager_one(
    color_images: NoisyDataset, precision: str, mode: str
) -> None:
    config = dataclasses.replace(FAST, model="small_cnn", precision=precision)
    eager = score_noise(color_images.samples, color_images.labels, config=config, device="cuda")
    compiled = score_noise(
        color_images.samples,
        color_images.labels,
        config=dataclasses.replace(config, compile_model=True, compile_mode=mode),
        device="cuda",
    )
    assert (compiled.config.compile_model, compiled.config.compile_mode) == (True, mode)
    correlation = np.corrcoef(
        np.argsort(np.argsort(eager.noise_scores)), np.argsort(np.argsort(compiled.noise_scores))
    )
    assert correlation[0, 1] > 0.9
