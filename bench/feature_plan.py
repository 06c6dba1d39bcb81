"""How the training plan for feature vectors affects detection: batch sizes, stage-1 length, score.

Scores synthetic feature sets (the generator of `speed.py` and `scale.py`, 20% symmetric noise)
with the engine's default plan and with variants of it, and prints each run's AUROC, P@k and
estimated noise rate; `--cleanlab` adds cleanlab's 5-fold pipeline trained with the default
plan on the sets of at most 20,000 samples. Variants (B1/B2 = stage 1/2 batch):

- `default`: the engine's plan (B2 = B1 / 2).
- `b2-128`: the stage-2 batch capped at 128 samples.
- `both-256`: B1 at most 256, B2 = B1 / 2, stage 1 still 300 steps.
- `stage1-600`: the default batches, stage 1 long enough for 600 steps instead of 300.
- `o2u_loss`, `aum`: the default plan ranked by the paper's loss or by the margin alone instead of
  the default `loss_margin` (the mean of the two ranks); the training is the same.

Sets: digits as 64-d features, then 10,000 x 512, 20,000 x 128, 20,000 x 512 (noise seeds 0 and
1), 50,000 x 128, 100,000 x 128 and 100,000 x 512 (seed 0). About 30 minutes with `--cleanlab`
on one core.
Usage: `python bench/feature_plan.py [--cleanlab] [--variants default,b2-128]`.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
from baselines import BaselineTrainer
from common import (
    THREADS_HELP,
    NoiseSetting,
    detection_metrics,
    format_table,
    inject_noise,
    load_digits_features,
    machine_description,
    set_threads,
    stopwatch,
    synthetic_features,
)

import o2u_engine
from o2u_engine import O2UConfig
from o2u_engine.resolve import PRETRAIN_TARGET_STEPS

NOISE = NoiseSetting("symmetric", 0.2)
NUM_CLASSES = 10
SEED = 0
VARIANTS = ("default", "b2-128", "both-256", "stage1-600", "o2u_loss", "aum")
SETS = ((10_000, 512), (20_000, 128), (20_000, 512), (50_000, 128), (100_000, 128), (100_000, 512))
CLEANLAB_MAX_SAMPLES = 20_000


def pretrain_epochs(num_samples: int, batch: int, steps: int) -> int:
    """The engine's stage-1 rule (below a million samples) for a different step target."""
    return min(40, max(5, math.ceil(steps / math.ceil(num_samples / batch))))


def variant_config(name: str, samples: np.ndarray) -> O2UConfig:
    """The variant's config for `samples`, built from the engine's own resolved default."""
    default = o2u_engine.resolve_config(
        O2UConfig(seed=SEED),
        num_samples=len(samples),
        sample_shape=samples.shape[1:],
        num_classes=NUM_CLASSES,
        device="cpu",
    )
    batch = default.pretrain_batch_size
    assert batch is not None
    if name == "default":
        return O2UConfig(seed=SEED)
    if name == "b2-128":
        return O2UConfig(seed=SEED, cyclic_batch_size=max(2, min(128, batch // 2)))
    if name == "both-256":
        small = min(256, batch)
        return O2UConfig(
            seed=SEED,
            pretrain_batch_size=small,
            cyclic_batch_size=max(2, small // 2),
            pretrain_epochs=pretrain_epochs(len(samples), small, PRETRAIN_TARGET_STEPS),
        )
    if name == "stage1-600":
        return O2UConfig(seed=SEED, pretrain_epochs=pretrain_epochs(len(samples), batch, 600))
    if name in ("o2u_loss", "aum"):
        return O2UConfig(seed=SEED, score=name)
    raise ValueError(f"unknown variant {name!r}; expected one of {', '.join(VARIANTS)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS)
    )
    parser.add_argument("--cleanlab", action="store_true", help="add cleanlab on sets of <= 20,000 samples")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    threads = set_threads(args.threads)
    print(f"machine: {machine_description()}; torch threads: {threads}", flush=True)

    datasets: list[tuple[str, np.ndarray, np.ndarray]] = [("digits 1,797 x 64", *load_digits_features())]
    for num_samples, dim in SETS:
        features, clean = synthetic_features(num_samples, dim, NUM_CLASSES, seed=SEED)
        datasets.append((f"{num_samples:,} x {dim}", features, clean))

    rows: list[list[object]] = []
    for name, samples, clean in datasets:
        noise_seeds = (0, 1) if CLEANLAB_MAX_SAMPLES >= len(samples) >= 10_000 else (0,)
        for noise_seed in noise_seeds:
            labels, flipped = inject_noise(clean, NOISE, NUM_CLASSES, seed=noise_seed)
            cleanlab_auroc = float("nan")
            for variant in variants:
                config = variant_config(variant, samples)
                with stopwatch() as seconds:
                    report = o2u_engine.score_noise(samples, labels, config=config, num_classes=NUM_CLASSES)
                metrics = detection_metrics(report.noise_scores, flipped)
                c = report.config
                if variant == "default" and args.cleanlab and len(samples) <= CLEANLAB_MAX_SAMPLES:
                    cleanlab = BaselineTrainer(samples, labels, NUM_CLASSES, c).cleanlab(folds=5)
                    cleanlab_auroc = detection_metrics(cleanlab.suspicion, flipped).auroc
                row = [
                    name,
                    noise_seed,
                    variant,
                    f"{c.pretrain_epochs}+{c.cycle_length_epochs}x{c.num_cycles}",
                    f"{c.pretrain_batch_size}/{c.cyclic_batch_size}",
                    seconds[0],
                    f"{metrics.auroc:.4f}",
                    metrics.precision_at_k,
                    report.estimated_noise_rate,
                    f"{cleanlab_auroc:.4f}" if variant == "default" and not np.isnan(cleanlab_auroc) else "-",
                ]
                print("  " + " | ".join(str(v) for v in row), flush=True)
                rows.append(row)
    header = [
        "set",
        "noise seed",
        "variant",
        "epochs",
        "batch",
        "O2U s",
        "AUROC",
        "P@k",
        "est. rate",
        "cleanlab AUROC",
    ]
    print(format_table(header, rows))
    means = {
        v: np.mean([float(str(r[6])) for r in rows if r[2] == v and r[0] != "digits 1,797 x 64"])
        for v in variants
    }
    print("summary: mean_synthetic_auroc(" + " ".join(f"{v}={m:.4f}" for v, m in means.items()) + ")")


if __name__ == "__main__":
    main()
