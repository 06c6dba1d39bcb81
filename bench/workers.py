"""One job on 1 and on N data-parallel workers (`o2u_engine.launch.score_noise_workers`).

Runs the same seeded O2U job with world size 1 and with each `--workers` value, alternately
(`--repeats` rounds), on scikit-learn's digits with 20% symmetric noise: `small_cnn` on the 8x8
images (BatchNorm, so the shards' statistics matter) and the MLP on the 64-d features. Prints wall
time (worker start-up included), training samples/s of stages 1 and 2 (all workers together),
AUROC and its difference to one worker, and the communication per epoch: seconds spent in the
collectives (waiting for the slowest worker included) and bytes all-reduced, from the run's
`timings`. On a CPU the workers share the cores (one torch thread each), so this measures the
cost of the distributed path, not a speed-up; on a machine with several GPUs pass `--device cuda`.
Usage: `PYTHONPATH=. python bench/workers.py [--workers 2] [--repeats 2] [--device cpu]`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import (
    NoiseSetting,
    detection_metrics,
    format_table,
    inject_noise,
    load_digits_features,
    load_digits_images,
    machine_description,
)

from o2u_engine import O2UConfig, configure_cpu_threads
from o2u_engine.launch import score_noise_workers

SETS = {
    "digits 8x8 small_cnn": (load_digits_images, O2UConfig(seed=0, model="small_cnn")),
    "digits 64-d mlp": (load_digits_features, O2UConfig(seed=0, model="mlp")),
}


def _run(name: str, workers: int, device: str) -> dict[str, float]:
    load, config = SETS[name]
    features, labels = load()
    noisy, flipped = inject_noise(labels, NoiseSetting("symmetric", 0.2), 10, seed=0)
    started = time.perf_counter()
    report = score_noise_workers(
        features, noisy, world_size=workers, device=device, config=config, num_classes=10
    )
    wall = time.perf_counter() - started
    resolved = report.config
    epochs = resolved.pretrain_epochs + resolved.cycle_length_epochs * resolved.num_cycles
    timings = report.timings
    samples = len(noisy)
    return {
        "wall": wall,
        "stage1": samples * resolved.pretrain_epochs / timings["pretraining"],
        "stage2": samples * resolved.cycle_length_epochs * resolved.num_cycles / timings["cyclic"],
        "auroc": detection_metrics(report.noise_scores, flipped).auroc,
        "comm_seconds": timings.get("communication", 0.0) / epochs,
        "comm_mb": timings.get("communication_bytes", 0.0) / epochs / 1e6,
        "epoch_seconds": (timings["pretraining"] + timings["cyclic"]) / epochs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[2])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, or the first GPU (cuda:0)")
    args = parser.parse_args()
    configure_cpu_threads(1)  # the single worker gets one thread, as each of several does here
    print(machine_description())
    for name in SETS:
        results: dict[int, list[dict[str, float]]] = {}
        for _ in range(args.repeats):
            for workers in (1, *args.workers):
                results.setdefault(workers, []).append(_run(name, workers, args.device))
        base = float(np.mean([r["auroc"] for r in results[1]]))
        rows = []
        for workers, runs in results.items():
            median = {key: float(np.median([r[key] for r in runs])) for key in runs[0]}
            rows.append(
                [
                    workers,
                    f"{median['wall']:.1f}",
                    f"{median['stage1']:.0f}",
                    f"{median['stage2']:.0f}",
                    f"{median['auroc']:.4f}",
                    f"{median['auroc'] - base:+.4f}",
                    f"{median['epoch_seconds']:.3f}",
                    f"{median['comm_seconds']:.3f}",
                    f"{median['comm_mb']:.2f}",
                ]
            )
        print(f"\n{name} ({args.repeats} runs each, medians)")
        header = [
            "workers",
            "wall s",
            "stage 1/s",
            "stage 2/s",
            "AUROC",
            "vs 1",
            "s/epoch",
            "comm s/epoch",
            "comm MB/epoch",
        ]
        print(format_table(header, rows))


if __name__ == "__main__":
    main()
