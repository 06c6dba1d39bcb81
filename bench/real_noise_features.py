"""Detection quality on real label noise in feature vectors: CIFAR-10N as embeddings.

Teams that score embeddings (from a frozen encoder) instead of images send `(N, D)` vectors. To
measure that path on real annotator mistakes, CIFAR-10N is split in two halves of 500 images per
true class: an encoder (the engine's `small_cnn`, trained on the first half with its *true* labels,
crop + flip) embeds the second half as 128-d vectors (its pooled last block). Those 5,000 vectors
with each human label set - aggregate, random1, worst - are scored as feature vectors; the first
half's true labels never reach the detectors, and the second half's only grade them. The encoder
is a modest one (about 60% accuracy on the second half), as a domain encoder trained on few
labels is. To keep injected noise in view, scikit-learn's digits as 64-d feature vectors with
symmetric 20% and pair 30% noise follow.

Every method trains the engine's default network and recipe for these vectors (the MLP; see
baselines.py): O2U with its defaults and with the paper's `o2u_loss` score (retrained), cleanlab
5-fold, small loss and AUM; the columns are those of `real_noise.py`.

Usage: `python bench/real_noise_features.py [--data PATH] [--encoder-epochs E] [--no-digits]
[--digit-seeds 0,1,2]`; about 6 minutes on two cores. The last line is `summary:` over the
CIFAR-10N embedding sets.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import (
    THREADS_HELP,
    format_table,
    inject_noise,
    load_digits_features,
    machine_description,
    set_threads,
)
from real_noise import (
    DEFAULT_DATA,
    DIGIT_SETTINGS,
    HEADER,
    LABEL_SETS,
    NUM_CLASSES,
    Row,
    load_cifar10n,
    run_set,
    summary,
)
from torch import nn

from o2u_engine.models import build_model

ENCODER_IMAGES_PER_CLASS = 500
ENCODER_BATCH = 128
ENCODER_PADDING = 4  # pixels of the random crop
ENCODER_SEED = 0


def encoder_split(clean: np.ndarray) -> np.ndarray:
    """(N,) bool: the first ENCODER_IMAGES_PER_CLASS images of every true class, in file order."""
    chosen = np.zeros(len(clean), dtype=bool)
    for label in range(NUM_CLASSES):
        chosen[np.flatnonzero(clean == label)[:ENCODER_IMAGES_PER_CLASS]] = True
    return chosen


def planar(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1]."""
    return torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255


def train_encoder(images: torch.Tensor, labels: torch.Tensor, epochs: int) -> nn.Module:
    """small_cnn trained on (images, labels) with a one-cycle SGD schedule, crop + flip."""
    generator = torch.Generator().manual_seed(ENCODER_SEED)
    torch.manual_seed(ENCODER_SEED)
    model = build_model("small_cnn", in_channels=3, num_classes=NUM_CLASSES, image_size=32, feature_dim=None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps_per_epoch = -(-len(labels) // ENCODER_BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.1, total_steps=epochs * steps_per_epoch)
    side = images.shape[-1]
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), ENCODER_BATCH):
            batch = order[start : start + ENCODER_BATCH]
            padded = F.pad(images[batch], (ENCODER_PADDING,) * 4, mode="reflect")
            dx, dy = torch.randint(0, 2 * ENCODER_PADDING + 1, (2,), generator=generator).tolist()
            crop = padded[:, :, dy : dy + side, dx : dx + side]
            if torch.rand(1, generator=generator).item() < 0.5:
                crop = crop.flip(3)
            loss = F.cross_entropy(model(crop), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        print(f"  encoder epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}", flush=True)
    return model.eval()


def embed(model: nn.Module, images: torch.Tensor) -> np.ndarray:
    """The pooled last block of `model` (every layer but the classifier), (N, 128) float32."""
    trunk = nn.Sequential(*list(model.children())[:-1])
    with torch.no_grad():
        parts = [trunk(images[start : start + 500]) for start in range(0, len(images), 500)]
    return torch.cat(parts).numpy().astype(np.float32)


def cifar10n_embeddings(data: Mapping[str, np.ndarray], epochs: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(vectors (M, 128), scored (N,) bool, accuracy): the encoder trained `epochs` on the true
    labels of encoder_split embeds the other images (`scored`); its accuracy on them."""
    images, clean = data["x"], data["y_clean"]
    encoder_part = encoder_split(clean)
    scored = ~encoder_part
    trained_on = planar(images[encoder_part])
    mean, std = trained_on.mean(dim=(0, 2, 3), keepdim=True), trained_on.std(dim=(0, 2, 3), keepdim=True)
    model = train_encoder((trained_on - mean) / std, torch.as_tensor(clean[encoder_part]), epochs)
    vectors = embed(model, (planar(images[scored]) - mean) / std)
    with torch.no_grad():  # the classifier on the embeddings: the encoder's own predictions
        predicted = model[-1](torch.as_tensor(vectors)).argmax(dim=1).numpy()
    return vectors, scored, float((predicted == clean[scored]).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the cifar10n_10k.npz file")
    parser.add_argument("--encoder-epochs", type=int, default=30, help="epochs of the encoder (default 30)")
    parser.add_argument("--no-digits", action="store_true", help="skip the digits sets")
    parser.add_argument(
        "--digit-seeds", default="0", help="comma-separated noise seeds of the digits sets (default 0)"
    )
    parser.add_argument("--threads", type=int, default=0, help=THREADS_HELP)
    args = parser.parse_args()
    data = load_cifar10n(args.data)
    threads = set_threads(args.threads)
    print(f"machine: {machine_description()}; torch threads: {threads}", flush=True)
    clean = data["y_clean"]
    began = time.perf_counter()
    vectors, scored, accuracy = cifar10n_embeddings(data, args.encoder_epochs)
    print(
        f"data: {len(vectors)} CIFAR-10N images as {vectors.shape[1]}-d embeddings; encoder trained on "
        f"the other {int((~scored).sum())} ({time.perf_counter() - began:.0f} s), its accuracy on the "
        f"embedded half {accuracy:.3f}",
        flush=True,
    )
    rows: list[Row] = []
    for label_set in LABEL_SETS:
        labels = data[f"y_{label_set}"][scored]
        rows += run_set(f"cifar10n-embedding-{label_set}", vectors, labels, clean[scored], "cpu", True)
    if not args.no_digits:
        digits, digit_labels = load_digits_features()
        seeds = [int(seed) for seed in args.digit_seeds.split(",")]
        for setting in DIGIT_SETTINGS:
            for seed in seeds:
                noisy, _ = inject_noise(digit_labels, setting, NUM_CLASSES, seed=seed)
                name = f"digits-features-{setting.name}" + (f"-seed{seed}" if len(seeds) > 1 else "")
                rows += run_set(name, digits, noisy, digit_labels, "cpu", True)
    print(f"\nk = true number of wrong labels; total {time.perf_counter() - began:.0f} s")
    print(format_table(HEADER, [r.cells() for r in rows]))
    summary(rows, auroc_margin=0.0)


if __name__ == "__main__":
    main()
