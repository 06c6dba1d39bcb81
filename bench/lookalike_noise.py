"""Detection quality under instance-dependent noise on look-alike samples: O2U against cleanlab.

Symmetric and pair noise pick the flipped samples at random, so a flipped label sits on a typical
sample of its true class, far from the class it was given: easy to see. Real annotators err on
samples that resemble another class, towards that class (CIFAR-10N's mistakes are mostly cat/dog,
truck/automobile, deer/horse). This script injects that kind of noise into sets with known true
labels (`common.lookalike_noise`: in every class, the samples a held-out linear model finds most
like another class are the likeliest to take that class's label) and runs the methods of
`real_noise.py` on them: scikit-learn's digits as 8x8 images and as 64-d feature vectors, and
synthetic 128-d vectors, at 10%, 20% and 30%, noise seeds 0, 1, 2 (0 only with `--quick`).

Usage: `python bench/lookalike_noise.py [--quick] [--no-synthetic]`; the last line is `summary:`.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np
from common import (
    THREADS_HELP,
    format_table,
    load_digits_features,
    load_digits_images,
    lookalike_noise,
    machine_description,
    set_threads,
    synthetic_features,
)
from real_noise import HEADER, NUM_CLASSES, Row, run_set

RATES = (0.1, 0.2, 0.3)
SYNTHETIC_SIZE = (10_000, 128)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="noise seed 0 only")
    parser.add_argument("--no-synthetic", action="store_true", help="skip the synthetic vectors")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    args = parser.parse_args()
    seeds = [0] if args.quick else [0, 1, 2]
    threads = set_threads(args.threads)
    print(f"machine: {machine_description()}; torch threads: {threads}")
    digit_vectors, digit_labels = load_digits_features()
    digit_images, _ = load_digits_images()
    sets = [
        ("digits-images", digit_images, digit_vectors, digit_labels),
        ("digits-features", digit_vectors, digit_vectors, digit_labels),
    ]
    if not args.no_synthetic:
        vectors, labels = synthetic_features(*SYNTHETIC_SIZE, NUM_CLASSES, seed=0)
        sets.append((f"synthetic-{SYNTHETIC_SIZE[0]}x{SYNTHETIC_SIZE[1]}", vectors, vectors, labels))
    print(
        f"data: {', '.join(name for name, *_ in sets)}; look-alike noise at "
        f"{', '.join(f'{r:.0%}' for r in RATES)}, noise seeds {seeds}",
        flush=True,
    )
    began = time.perf_counter()
    rows: list[Row] = []
    for name, samples, seen, clean in sets:
        for rate in RATES:
            for seed in seeds:
                noisy, _ = lookalike_noise(seen, clean, rate, NUM_CLASSES, seed=seed)
                label = f"{name}-lookalike-{rate:.0%}" + (f"-seed{seed}" if len(seeds) > 1 else "")
                rows += run_set(label, samples, noisy, clean, "cpu", False)
    print(f"\nk = true number of wrong labels; total {time.perf_counter() - began:.0f} s")
    print(format_table(HEADER, [r.cells() for r in rows]))
    summary(rows)


def summary(rows: list[Row]) -> None:
    """Means per kind of data (images, features) of O2U's and cleanlab's figures, and the sets where
    O2U's AUROC and AP are at least cleanlab's."""
    by: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for r in rows:
        method = "o2u" if r.method.startswith("o2u (") else r.method
        by["images" if "images" in r.data_set else "features", method].append(r)
    fields = {
        "auroc": lambda r: r.detection.auroc,
        "ap": lambda r: r.detection.average_precision,
        "f1": lambda r: r.detection.f1,
        "rate_error": lambda r: abs(r.detection.estimated_noise_rate - r.detection.true_noise_rate),
        "fix_at_k": lambda r: r.fix_at_k,
    }
    parts = []
    for kind in ("images", "features"):
        o2u, cleanlab = by[kind, "o2u"], by[kind, "cleanlab"]
        if not o2u:
            continue
        for field, read in fields.items():
            for method, group in (("o2u", o2u), ("cleanlab", cleanlab)):
                parts.append(f"{kind}_{method}_{field}={np.mean([read(r) for r in group]):.3f}")
        for field in ("auroc", "ap"):
            wins = sum(fields[field](a) >= fields[field](b) for a, b in zip(o2u, cleanlab, strict=True))
            print(f"{kind}: O2U {field.upper()} >= cleanlab's on {wins}/{len(o2u)} sets")
    print("summary: " + " ".join(parts))


if __name__ == "__main__":
    main()
