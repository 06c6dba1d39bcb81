"""bf16 autocast against fp32 on this CPU: full default O2U runs of each CPU model, both precisions.

The engine picks bf16 autocast on a CPU only for the convolutional models and only when the CPU has
native bf16 (AVX512-BF16 / AMX); the MLP stays in fp32. This script checks that choice where it
runs: each dataset is scored with `precision="fp32"` and with `precision="bf16"` (everything else
the resolved default), alternately for `--rounds` rounds, and it prints the median wall times,
their ratio, both AUROCs and how much the two rankings agree. Datasets: scikit-learn's digits as
8x8 images (`small_cnn`) and as 64-d features (`mlp`), 3,000 synthetic 32x32 RGB images
(`small_cnn`) and 20,000 x 512 synthetic features (`mlp`), each with 20% symmetric label noise.
Usage: `python bench/cpu_precision.py [--rounds 3]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import numpy as np
from common import (
    THREADS_HELP,
    NoiseSetting,
    detection_metrics,
    format_table,
    inject_noise,
    load_digits_features,
    load_digits_images,
    machine_description,
    set_threads,
    stopwatch,
    synthetic_features,
    synthetic_images,
)
from scipy.stats import spearmanr

import o2u_engine
from o2u_engine import O2UConfig
from o2u_engine.runtime import cpu_has_fast_bf16

NOISE = NoiseSetting("symmetric", 0.2)
NUM_CLASSES = 10
SEED = 0
PRECISIONS = ("fp32", "bf16")


@dataclasses.dataclass(frozen=True)
class Comparison:
    dataset: str
    model: str
    default_precision: str
    seconds: dict[str, float]  # median wall time per precision
    auroc: dict[str, float]
    rank_correlation: float  # Spearman, fp32 scores vs bf16 scores


def compare(dataset: str, samples: np.ndarray, clean: np.ndarray, rounds: int) -> Comparison:
    labels, flipped = inject_noise(clean, NOISE, NUM_CLASSES, seed=SEED)
    times: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    scores: dict[str, np.ndarray] = {}
    resolved: O2UConfig | None = None
    for round_index in range(rounds):
        order = PRECISIONS if round_index % 2 == 0 else PRECISIONS[::-1]  # alternate who runs first
        for precision in order:
            config = O2UConfig(seed=SEED, precision=precision)
            with stopwatch() as seconds:
                report = o2u_engine.score_noise(samples, labels, config=config, num_classes=NUM_CLASSES)
            times[precision].append(seconds[0])
            scores[precision] = report.noise_scores
            resolved = report.config
    assert resolved is not None
    auto = o2u_engine.resolve_config(
        O2UConfig(seed=SEED),
        num_samples=len(samples),
        sample_shape=samples.shape[1:],
        num_classes=NUM_CLASSES,
        device="cpu",
    )
    result = Comparison(
        dataset=dataset,
        model=str(resolved.model),
        default_precision=str(auto.precision),
        seconds={p: statistics.median(t) for p, t in times.items()},
        auroc={p: detection_metrics(s, flipped).auroc for p, s in scores.items()},
        rank_correlation=float(spearmanr(scores["fp32"], scores["bf16"]).statistic),
    )
    print(f"  {result}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs per precision (median)")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    args = parser.parse_args()
    threads = set_threads(args.threads)
    print(
        f"machine: {machine_description()}; torch threads: {threads}; "
        f"native bf16 (AVX512-BF16/AMX): {cpu_has_fast_bf16()}",
        flush=True,
    )
    images, image_labels = synthetic_images(3_000, NUM_CLASSES, seed=SEED)
    features, feature_labels = synthetic_features(20_000, 512, NUM_CLASSES, seed=SEED)
    results = [
        compare("digits 1,797 x 8x8", *load_digits_images(), args.rounds),
        compare("synthetic 3,000 x 32x32x3", images, image_labels, args.rounds),
        compare("digits 1,797 x 64", *load_digits_features(), args.rounds),
        compare("synthetic 20,000 x 512", features, feature_labels, args.rounds),
    ]
    header = [
        "dataset",
        "model",
        "default",
        "fp32 s",
        "bf16 s",
        "bf16/fp32",
        "fp32 AUROC",
        "bf16 AUROC",
        "rank corr.",
    ]
    rows = [
        [
            r.dataset,
            r.model,
            r.default_precision,
            r.seconds["fp32"],
            r.seconds["bf16"],
            r.seconds["bf16"] / r.seconds["fp32"],
            f"{r.auroc['fp32']:.4f}",
            f"{r.auroc['bf16']:.4f}",
            r.rank_correlation,
        ]
        for r in results
    ]
    print(format_table(header, rows))
    # The default is right when it picks the faster precision for the model.
    right = sum((r.seconds["bf16"] < r.seconds["fp32"]) == (r.default_precision == "bf16") for r in results)
    ratios = " ".join(f"{r.seconds['bf16'] / r.seconds['fp32']:.2f}" for r in results)
    print(f"summary: bf16_over_fp32=[{ratios}] default_picks_faster={right}/{len(results)}")


if __name__ == "__main__":
    main()
