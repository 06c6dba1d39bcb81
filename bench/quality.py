"""Detection quality on real data: O2U against cleanlab, small loss and AUM on noisy digits.

scikit-learn's 1,797 real handwritten digits (8x8 images) get injected label noise - symmetric
20% and 40%, pair (i -> i+1) 30% and 45% - under three seeds (one with --quick). Every method
trains the same network (the engine's default for these images) with the same recipe and epoch
budget per training, so only the scoring differs (see baselines.py). Reported per setting, as
means over the seeds: AUROC and average precision of the ranking, precision and recall among
the top k = (true number of flipped labels), F1 of the method's own suspected set (O2U: its
estimated noise rate, no oracle; cleanlab: find_label_issues), estimated vs true noise rate, and
wall time. Usage: `python bench/quality.py [--quick]`; the last line is the `summary:`.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np
from baselines import BaselineTrainer
from common import (
    THREADS_HELP,
    Detection,
    NoiseSetting,
    detection_metrics,
    format_table,
    inject_noise,
    load_digits_images,
    machine_description,
    set_threads,
    stopwatch,
)

import o2u_engine
from o2u_engine import O2UConfig

SETTINGS = (
    NoiseSetting("symmetric", 0.2),
    NoiseSetting("symmetric", 0.4),
    NoiseSetting("pair", 0.3),
    NoiseSetting("pair", 0.45),
)
METHODS = ("o2u", "cleanlab", "small-loss", "aum")
NUM_CLASSES = 10


def run_setting(
    images: np.ndarray, clean: np.ndarray, setting: NoiseSetting, seed: int
) -> dict[str, tuple[Detection, float]]:
    """All four methods on one noisy copy of the data: method -> (metrics, wall seconds)."""
    labels, flipped = inject_noise(clean, setting, NUM_CLASSES, seed=seed)
    with stopwatch() as o2u_seconds:
        report = o2u_engine.score_noise(images, labels, config=O2UConfig(seed=seed), num_classes=NUM_CLASSES)
    baselines = BaselineTrainer(images, labels, NUM_CLASSES, report.config)
    cleanlab = baselines.cleanlab(folds=5)
    plain = baselines.plain_run()
    return {
        "o2u": (detection_metrics(report.noise_scores, flipped, report.suspected), o2u_seconds[0]),
        "cleanlab": (detection_metrics(cleanlab.suspicion, flipped, cleanlab.suspected), cleanlab.seconds),
        "small-loss": (detection_metrics(plain.stage1_losses, flipped), plain.stage1_seconds),
        "aum": (detection_metrics(-plain.mean_margins, flipped), plain.seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed instead of three")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    args = parser.parse_args()
    seeds = [0] if args.quick else [0, 1, 2]
    threads = set_threads(args.threads)
    images, clean = load_digits_images()  # (N, 8, 8) uint8, (N,)
    config = o2u_engine.resolve_config(
        O2UConfig(),
        num_samples=len(clean),
        sample_shape=images.shape[1:],
        num_classes=NUM_CLASSES,
        device="cpu",
    )
    print(f"machine: {machine_description()}; torch threads: {threads}")
    print(
        f"data: digits {images.shape} uint8, seeds {seeds}; model {config.model}, "
        f"image_size {config.image_size}, "
        f"epochs {config.pretrain_epochs} + {config.cycle_length_epochs}x{config.num_cycles}, "
        f"batch {config.pretrain_batch_size}/{config.cyclic_batch_size}, augment {config.augment}, "
        f"precision {config.precision}; cleanlab: 5 folds of the same budget",
        flush=True,
    )

    began = time.perf_counter()
    results: dict[tuple[str, str], list[tuple[Detection, float]]] = defaultdict(list)
    for setting in SETTINGS:
        for seed in seeds:
            for method, outcome in run_setting(images, clean, setting, seed).items():
                results[setting.name, method].append(outcome)
                detection, seconds = outcome
                print(
                    f"  {setting.name:14} seed {seed} {method:10} auroc {detection.auroc:.3f} "
                    f"p@k {detection.precision_at_k:.3f} f1 {detection.f1:.3f} "
                    f"est {detection.estimated_noise_rate:.3f} {seconds:6.1f} s",
                    flush=True,
                )

    def mean(setting: str, method: str, field: str) -> float:
        runs = results[setting, method]
        if field == "seconds":
            return float(np.mean([s for _, s in runs]))
        return float(np.mean([getattr(d, field) for d, _ in runs]))

    fields = ["auroc", "average_precision", "precision_at_k", "recall_at_k", "f1"]
    fields += ["estimated_noise_rate", "true_noise_rate", "seconds"]
    header = ["setting", "method", "AUROC", "AP", "P@k", "R@k", "F1", "est. rate", "true rate", "time s"]
    rows = [[s.name, m, *(mean(s.name, m, f) for f in fields)] for s in SETTINGS for m in METHODS]
    print(
        f"\nmeans over {len(seeds)} seed(s); k = true number of flipped labels; "
        f"total {time.perf_counter() - began:.0f} s"
    )
    print(format_table(header, rows))

    names = [s.name for s in SETTINGS]
    for field, label in (("auroc", "AUROC"), ("precision_at_k", "P@k")):
        wins = [n for n in names if mean(n, "o2u", field) >= mean(n, "cleanlab", field)]
        print(
            f"target O2U {label} >= cleanlab: {len(wins)}/{len(names)} settings"
            + (f" (misses: {', '.join(n for n in names if n not in wins)})" if len(wins) < len(names) else "")
        )
    averages = {
        (m, f): float(np.mean([mean(n, m, f) for n in names]))
        for m in ("o2u", "cleanlab")
        for f in ("auroc", "precision_at_k", "seconds")
    }
    ratio = averages["o2u", "seconds"] / averages["cleanlab", "seconds"]
    print(f"target O2U time <= 1/3 of cleanlab's: ratio {ratio:.3f}")
    print(
        f"summary: o2u_auroc={averages['o2u', 'auroc']:.3f} "
        f"cleanlab_auroc={averages['cleanlab', 'auroc']:.3f} "
        f"o2u_p_at_k={averages['o2u', 'precision_at_k']:.3f} "
        f"cleanlab_p_at_k={averages['cleanlab', 'precision_at_k']:.3f} time_ratio={ratio:.3f}"
    )


if __name__ == "__main__":
    main()
