"""Shared pieces of the benchmark scripts: datasets, label noise, detection metrics, timing, tables.

Every benchmark scores the same thing - how well a method ranks the samples whose labels were
flipped on purpose - so the data (scikit-learn's real digits, or a synthetic feature set of any
size), the noise injection (symmetric, pair or on look-alike samples, exact per-class rates,
seeded) and the metrics (AUROC, average precision, precision/recall at k = number of flipped
labels, F1 of a method's own suspected set) live here once. It imports NumPy, scikit-learn and
the standard library at the top (torch and the engine only inside the two functions that need
them), so the GPU script can use it on a machine without the service's other dependencies.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

# ---------------------------------------------------------------------------------------------------
# Data


def load_digits_features() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 real 8x8 handwritten digits as (N, 64) float32 in [0, 1] and (N,) labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    features = (digits.data / 16.0).astype(np.float32)  # (N, 64); pixel values are 0..16
    return features, digits.target.astype(np.int64)


def load_digits_images() -> tuple[np.ndarray, np.ndarray]:
    """The same digits as (N, 8, 8) uint8 images (0..255), the form an image-labelling team submits."""
    features, labels = load_digits_features()
    return np.round(features.reshape(-1, 8, 8) * 255).astype(np.uint8), labels


def synthetic_features(
    num_samples: int, dim: int, num_classes: int, *, seed: int, clusters_per_class: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """A learnable but not linearly separable feature set, like embeddings from a frozen encoder.

    Each class is a mixture of `clusters_per_class` Gaussian blobs whose centres are random, so a
    linear model cannot fit it and a small MLP can, given enough samples.
    """
    features = np.empty((num_samples, dim), dtype=np.float32)
    labels = np.empty(num_samples, dtype=np.int64)
    for start, chunk, chunk_labels in synthetic_feature_chunks(
        num_samples, dim, num_classes, seed=seed, clusters_per_class=clusters_per_class
    ):
        features[start : start + len(chunk)] = chunk
        labels[start : start + len(chunk)] = chunk_labels
    return features, labels


def synthetic_feature_chunks(
    num_samples: int,
    dim: int,
    num_classes: int,
    *,
    seed: int,
    clusters_per_class: int = 4,
    chunk_size: int = 65_536,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yields (start, features (B, dim) float32, labels (B,)): a million rows never sit in RAM twice."""
    rng = np.random.default_rng(seed)
    num_clusters = num_classes * clusters_per_class
    # Centres on a sphere of radius 5 with unit noise per dimension: two centres lie about 7 apart
    # whatever `dim` is, so the task does not get easier with more dimensions; a 256-256 MLP
    # trained on 20,000 clean samples scores 96% at 128 dimensions and 84% at 512, a linear
    # model 77%.
    centres = rng.standard_normal((num_clusters, dim)).astype(np.float32)
    centres *= 5.0 / np.linalg.norm(centres, axis=1, keepdims=True)
    for start in range(0, num_samples, chunk_size):
        size = min(chunk_size, num_samples - start)
        cluster = rng.integers(0, num_clusters, size=size)
        chunk = centres[cluster] + rng.standard_normal((size, dim), dtype=np.float32)
        yield start, chunk, (cluster % num_classes).astype(np.int64)


def synthetic_images(
    num_samples: int, num_classes: int, *, seed: int, size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-sized uint8 images (N, size, size, 3) whose class is a smooth colour template.

    Each class owns a random 4x4 colour pattern blown up to full size; a sample is its class
    template, shifted by up to 4 pixels, with random brightness and strong pixel noise - learnable
    by a CNN in a few epochs, yet not from a single pixel.
    """
    rng = np.random.default_rng(seed)
    templates = rng.uniform(-1.0, 1.0, size=(num_classes, 4, 4, 3)).astype(np.float32)
    templates = templates.repeat(size // 4, axis=1).repeat(size // 4, axis=2)  # (K, size, size, 3)
    labels = rng.integers(0, num_classes, size=num_samples).astype(np.int64)
    images = np.empty((num_samples, size, size, 3), dtype=np.uint8)
    for start in range(0, num_samples, 4096):
        stop = min(start + 4096, num_samples)
        shifts = rng.integers(-4, 5, size=(stop - start, 2))
        base = templates[labels[start:stop]]
        base = np.stack([np.roll(b, tuple(s), axis=(0, 1)) for b, s in zip(base, shifts, strict=True)])
        brightness = rng.uniform(0.6, 1.4, size=(stop - start, 1, 1, 1)).astype(np.float32)
        noise = rng.standard_normal(base.shape, dtype=np.float32)
        pixels = 128.0 + 60.0 * brightness * base + 45.0 * noise
        images[start:stop] = np.clip(pixels, 0, 255).astype(np.uint8)
    return images, labels


# ---------------------------------------------------------------------------------------------------
# Label noise


@dataclass(frozen=True)
class NoiseSetting:
    kind: str  # "symmetric" (to any other class, uniformly) or "pair" (class i -> i+1 mod K)
    rate: float  # fraction of each class whose label is flipped

    @property
    def name(self) -> str:
        return f"{self.kind}-{round(self.rate * 100)}%"


def inject_noise(
    labels: np.ndarray, setting: NoiseSetting, num_classes: int, *, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Flips exactly round(rate x n_c) labels of every class c; returns (noisy labels, flipped mask).

    Per-class rates keep pair noise identifiable: drawn globally, some class could pass 50% by
    chance and its noise would become its majority. A flipped label always differs from the
    true one, so the mask is exactly the set of wrong labels.
    """
    if setting.kind not in ("symmetric", "pair"):
        raise ValueError(f"noise kind must be 'symmetric' or 'pair', got {setting.kind!r}")
    rng = np.random.default_rng(seed)
    noisy = labels.copy()
    flipped = np.zeros(len(labels), dtype=bool)
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        chosen = rng.choice(members, size=round(setting.rate * len(members)), replace=False)
        if setting.kind == "pair":
            noisy[chosen] = (c + 1) % num_classes
        else:  # a uniform draw over the K-1 other classes
            noisy[chosen] = (c + rng.integers(1, num_classes, size=len(chosen))) % num_classes
        flipped[chosen] = True
    return noisy, flipped


def lookalike_noise(
    samples: np.ndarray, labels: np.ndarray, rate: float, num_classes: int, *, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Instance-dependent noise on look-alike samples; returns (noisy labels, flipped mask).

    Annotators err on samples that resemble another class, towards that class. A multinomial
    logistic regression on the standardized, flattened samples gives every sample out-of-fold
    probabilities (5 seeded folds, so no sample's own label shapes its own); in every class c,
    exactly round(rate x n_c) members are drawn without replacement with a probability
    proportional to the largest probability of another class, and take that class. So a sample
    that looks like another class is likely to be flipped, towards the class it looks like, but
    as in real annotation, many look-alikes keep their right label and a few clear samples do not.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    flat = np.asarray(samples, dtype=np.float32).reshape(len(labels), -1)
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    probabilities = cross_val_predict(model, flat, labels, cv=folds, method="predict_proba")
    probabilities[np.arange(len(labels)), labels] = -1.0  # the most likely *other* class
    other = probabilities.argmax(axis=1)
    resemblance = probabilities.max(axis=1) + 1e-6  # every member can be drawn
    rng = np.random.default_rng(seed)
    noisy = labels.copy()
    flipped = np.zeros(len(labels), dtype=bool)
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        weights = resemblance[members] / resemblance[members].sum()
        chosen = rng.choice(members, size=round(rate * len(members)), replace=False, p=weights)
        noisy[chosen] = other[chosen]
        flipped[chosen] = True
    return noisy, flipped


# ---------------------------------------------------------------------------------------------------
# Metrics


@dataclass(frozen=True)
class Detection:
    auroc: float
    average_precision: float
    precision_at_k: float  # k = true number of flipped labels
    recall_at_k: float
    f1: float  # of the method's own suspected set; NaN when the method has none
    estimated_noise_rate: float  # NaN when the method gives no estimate
    true_noise_rate: float


def detection_metrics(
    suspicion: np.ndarray, flipped: np.ndarray, suspected: np.ndarray | None = None
) -> Detection:
    """Scores a ranking; `suspicion` is higher for more suspicious samples."""
    suspicion = np.asarray(suspicion, dtype=np.float64)
    num_flipped = int(flipped.sum())
    # A stable sort on the negated score keeps ties in sample order, so results are reproducible.
    top_k = np.argsort(-suspicion, kind="stable")[:num_flipped]
    hits = int(flipped[top_k].sum())
    f1 = estimated = float("nan")
    if suspected is not None:
        true_positives = int((suspected & flipped).sum())
        precision = true_positives / max(int(suspected.sum()), 1)
        recall = true_positives / max(num_flipped, 1)
        f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
        estimated = float(suspected.mean())
    return Detection(
        auroc=float(roc_auc_score(flipped, suspicion)),
        average_precision=float(average_precision_score(flipped, suspicion)),
        precision_at_k=hits / max(len(top_k), 1),
        recall_at_k=hits / max(num_flipped, 1),
        f1=f1,
        estimated_noise_rate=estimated,
        true_noise_rate=float(flipped.mean()),
    )


# ---------------------------------------------------------------------------------------------------
# Timing, memory, machine


@contextmanager
def stopwatch() -> Iterator[list[float]]:
    """`with stopwatch() as elapsed: ...` then `elapsed[0]` holds the wall-clock seconds."""
    elapsed = [0.0]
    start = time.perf_counter()
    try:
        yield elapsed
    finally:
        elapsed[0] = time.perf_counter() - start


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss_hwm_bytes() -> int | None:
    """VmHWM from /proc: the peak of this process image only (None off Linux).

    ru_maxrss can inherit the parent's peak when the child was started with vfork + exec, so
    the scale benchmark reports both and they must agree.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


THREADS_HELP = (
    "torch CPU threads (default 1: on a shared machine a second intra-op thread spin-waits for a "
    "descheduled partner and made steps 3-7x slower here; 0 = the engine's configure_cpu_threads())"
)


def set_threads(threads: int) -> int:
    """Fix torch's intra-op thread count for the whole benchmark (every method runs with the same)."""
    import o2u_engine

    return o2u_engine.configure_cpu_threads(max_threads=threads or None)


def machine_description() -> str:
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cores} CPU cores ({platform.processor() or platform.machine()}), {device}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}"
    )


# ---------------------------------------------------------------------------------------------------
# Tables


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain fixed-width table (also valid Markdown) so the output can be pasted into the docs."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return "-" if np.isnan(value) else f"{value:.3f}"
        return str(value)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) for i, h in enumerate(header)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in text]
    return "\n".join(lines)
