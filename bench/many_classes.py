"""Detection quality as the number of classes grows: O2U against cleanlab at 10, 30 and 100 classes.

Tagging and moderation taxonomies often have far more than CIFAR's ten classes, and every default
of the engine was chosen on ten. This script keeps everything else fixed - 20,000 synthetic
128-d vectors (`common.synthetic_features`, two clusters per class, so a linear model cannot fit
them), the engine's defaults for feature vectors - and grows the class count, under symmetric 20%
noise and under 20% look-alike noise (`common.lookalike_noise`). Every method of `real_noise.py`
runs on each set, plus O2U with three times its default stage 1 (`o2u, stage 1 x3`): with more
classes, fewer samples per class and the same number of steps, the network fits less of the data,
and that row shows what more training would change.

Usage: `python bench/many_classes.py [--classes 10,30,100] [--threads T]`; the last line is
`summary:`, O2U's and cleanlab's mean AUROC, AP and F1 per class count.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np
from common import (
    THREADS_HELP,
    NoiseSetting,
    format_table,
    inject_noise,
    lookalike_noise,
    machine_description,
    set_threads,
    stopwatch,
    synthetic_features,
)
from real_noise import HEADER, Row, row, run_set

import o2u_engine
from o2u_engine import O2UConfig

SIZE = (20_000, 128)
CLUSTERS_PER_CLASS = 2
RATE = 0.2
LONGER_STAGE_1 = 3  # times the default stage 1 epochs
LONGER = f"o2u, stage 1 x{LONGER_STAGE_1}"


def longer_stage_1(
    name: str, samples: np.ndarray, labels: np.ndarray, clean: np.ndarray, classes: int
) -> Row:
    """O2U with LONGER_STAGE_1 times the stage 1 epochs the engine resolves for this set."""
    resolved = o2u_engine.resolve_config(
        O2UConfig(),
        num_samples=len(labels),
        sample_shape=samples.shape[1:],
        num_classes=classes,
        device="cpu",
    )
    config = O2UConfig(pretrain_epochs=LONGER_STAGE_1 * resolved.pretrain_epochs)
    with stopwatch() as seconds:
        report = o2u_engine.score_noise(samples, labels, config=config, num_classes=classes, device="cpu")
    estimate = report.estimated_noise_rate
    print(f"  {name}: {LONGER}: {config.pretrain_epochs} epochs, rate estimate {estimate:.3f}", flush=True)
    wrong = labels != clean
    return row(
        name, LONGER, report.noise_scores, wrong, report.suspected, seconds[0], report.suggested_labels, clean
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", default="10,30,100", help="comma-separated class counts")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    args = parser.parse_args()
    counts = [int(c) for c in args.classes.split(",") if c]
    threads = set_threads(args.threads)
    print(f"machine: {machine_description()}; torch threads: {threads}")
    print(
        f"data: synthetic {SIZE[0]}x{SIZE[1]} vectors, {CLUSTERS_PER_CLASS} clusters per class, "
        f"{', '.join(map(str, counts))} classes; symmetric and look-alike noise at {RATE:.0%}",
        flush=True,
    )
    began = time.perf_counter()
    rows: list[Row] = []
    for classes in counts:
        vectors, clean = synthetic_features(*SIZE, classes, seed=0, clusters_per_class=CLUSTERS_PER_CLASS)
        for kind in ("symmetric", "lookalike"):
            if kind == "symmetric":
                noisy, _ = inject_noise(clean, NoiseSetting("symmetric", RATE), classes, seed=0)
            else:
                noisy, _ = lookalike_noise(vectors, clean, RATE, classes, seed=0)
            name = f"k{classes}-{kind}-{RATE:.0%}"
            rows += run_set(name, vectors, noisy, clean, "cpu", False, num_classes=classes)
            rows.append(longer_stage_1(name, vectors, noisy, clean, classes))
    print(f"\nk = true number of wrong labels; total {time.perf_counter() - began:.0f} s")
    print(format_table(HEADER, [r.cells() for r in rows]))
    summary(rows)


def summary(rows: list[Row]) -> None:
    """Mean AUROC, AP and F1 of O2U (default and longer stage 1) and cleanlab per class count."""
    by: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for r in rows:
        method = "o2u" if r.method.startswith("o2u (") else "o2u_x3" if r.method == LONGER else r.method
        by[r.data_set.split("-")[0], method].append(r)
    figures = []
    for classes in dict.fromkeys(r.data_set.split("-")[0] for r in rows):
        for method in ("o2u", "cleanlab", "o2u_x3"):
            group = by[classes, method]
            for field, short in (("auroc", "auroc"), ("average_precision", "ap"), ("f1", "f1")):
                value = float(np.mean([getattr(r.detection, field) for r in group]))
                figures.append(f"{classes}_{method}_{short}={value:.3f}")
    print("summary: " + " ".join(figures))


if __name__ == "__main__":
    main()
