"""Head-to-head cost: one O2U run against cleanlab's 5-fold pipeline, same data and same model.

O2U trains one network (stage 1 + cyclic stage) on all samples. cleanlab needs out-of-sample
predicted probabilities, so it trains the same network with the same per-fold epoch budget five
times on 4/5 of the data, predicts each held-out fold, then runs `find_label_issues`. Both run in
this one process, one after the other, so their ratio is meaningful on a busy machine. Datasets:
scikit-learn's digits (8x8 images, 20% symmetric noise) and a synthetic feature set (100,000 x
128 float32, 10 classes, 20% symmetric noise; 20,000 with --quick). The summary adds the wall
times over both datasets and averages the AUROCs. Usage: `python bench/speed.py [--quick]`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
from baselines import BaselineTrainer
from common import (
    THREADS_HELP,
    NoiseSetting,
    detection_metrics,
    format_table,
    inject_noise,
    load_digits_images,
    machine_description,
    set_threads,
    stopwatch,
    synthetic_features,
)

import o2u_engine
from o2u_engine import O2UConfig

NOISE = NoiseSetting("symmetric", 0.2)
NUM_CLASSES = 10
SEED = 0


@dataclass(frozen=True)
class Duel:
    dataset: str
    setup: str  # model, epochs and batch sizes of every training
    o2u_seconds: float
    cleanlab_seconds: float
    o2u_auroc: float
    cleanlab_auroc: float


def duel(dataset: str, samples: np.ndarray, clean: np.ndarray) -> Duel:
    labels, flipped = inject_noise(clean, NOISE, NUM_CLASSES, seed=SEED)
    with stopwatch() as o2u_seconds:
        report = o2u_engine.score_noise(samples, labels, config=O2UConfig(seed=SEED), num_classes=NUM_CLASSES)
    cleanlab = BaselineTrainer(samples, labels, NUM_CLASSES, report.config).cleanlab(folds=5)
    c = report.config
    result = Duel(
        dataset=dataset,
        setup=f"{c.model} {c.pretrain_epochs}+{c.cycle_length_epochs}x{c.num_cycles} ep, "
        f"batch {c.pretrain_batch_size}/{c.cyclic_batch_size}",
        o2u_seconds=o2u_seconds[0],
        cleanlab_seconds=cleanlab.seconds,
        o2u_auroc=detection_metrics(report.noise_scores, flipped).auroc,
        cleanlab_auroc=detection_metrics(cleanlab.suspicion, flipped).auroc,
    )
    print(f"  {result}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20,000 synthetic samples instead of 100,000")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    args = parser.parse_args()
    threads = set_threads(args.threads)
    print(f"machine: {machine_description()}; torch threads: {threads}", flush=True)
    num_synthetic = 20_000 if args.quick else 100_000

    duels = [duel("digits 1,797 x 8x8", *load_digits_images())]
    features, clean = synthetic_features(num_synthetic, 128, NUM_CLASSES, seed=SEED)  # (N, 128) float32
    duels.append(duel(f"synthetic {num_synthetic:,} x 128", features, clean))

    header = [
        "dataset",
        "model / epochs / batch",
        "O2U s",
        "cleanlab s",
        "ratio",
        "O2U AUROC",
        "cleanlab AUROC",
    ]
    rows = [
        [
            d.dataset,
            d.setup,
            d.o2u_seconds,
            d.cleanlab_seconds,
            d.o2u_seconds / d.cleanlab_seconds,
            f"{d.o2u_auroc:.4f}",  # AUROCs near 1 differ in the fourth digit
            f"{d.cleanlab_auroc:.4f}",
        ]
        for d in duels
    ]
    print(format_table(header, rows))
    o2u_total = sum(d.o2u_seconds for d in duels)
    cleanlab_total = sum(d.cleanlab_seconds for d in duels)
    misses = [d.dataset for d in duels if d.o2u_auroc < d.cleanlab_auroc]
    print(
        f"target ratio <= 0.33: {o2u_total / cleanlab_total:.3f}; O2U AUROC >= cleanlab's: "
        f"{len(duels) - len(misses)}/{len(duels)} datasets"
        + (f" (misses: {', '.join(misses)})" if misses else "")
    )
    print(
        f"summary: o2u_s={o2u_total:.1f} cleanlab_s={cleanlab_total:.1f} "
        f"ratio={o2u_total / cleanlab_total:.3f} "
        f"o2u_auroc={np.mean([d.o2u_auroc for d in duels]):.4f} "
        f"cleanlab_auroc={np.mean([d.cleanlab_auroc for d in duels]):.4f}"
    )


if __name__ == "__main__":
    main()
