"""Embedding mode at scale: wall time and peak memory of a full O2U run on N x 512 float32 features.

For each N (10k, 100k and --n) the features are written to a `.npy` file and scored by a fresh
Python process that opens them with `np.load(mmap_mode="r")`, so each run's peak resident set size
is its own (measured in the child with getrusage and cross-checked with /proc's VmHWM). The labels
carry 20% symmetric noise; the child reports AUROC so that speed is never bought with quality.
The engine runs fewer epochs on more samples, so linearity is judged on the work: wall time per
sample-epoch at the largest N divided by the same at 100k (1.0 = perfectly linear).
Usage: `python bench/scale.py --n 1000000`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    THREADS_HELP,
    NoiseSetting,
    detection_metrics,
    format_table,
    inject_noise,
    peak_rss_bytes,
    peak_rss_hwm_bytes,
    set_threads,
    synthetic_feature_chunks,
)

DIM = 512
NUM_CLASSES = 10
NOISE = NoiseSetting("symmetric", 0.2)
SEED = 0
GIB = 1024**3


def write_dataset(directory: Path, num_samples: int) -> None:
    """Streams the features to disk chunk by chunk; the parent never holds (or maps) the whole array."""
    labels = np.empty(num_samples, dtype=np.int64)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False}
    with open(directory / "features.npy", "wb") as file:
        np.lib.format.write_array_header_1_0(file, {**header, "shape": (num_samples, DIM)})
        for start, chunk, chunk_labels in synthetic_feature_chunks(num_samples, DIM, NUM_CLASSES, seed=SEED):
            chunk.tofile(file)
            labels[start : start + len(chunk)] = chunk_labels
    noisy, flipped = inject_noise(labels, NOISE, NUM_CLASSES, seed=SEED)
    np.save(directory / "labels.npy", noisy)
    np.save(directory / "flipped.npy", flipped)


def score_child(directory: Path, threads: int) -> None:
    """Runs in the child process: score the memory-mapped features and print one JSON line."""
    import o2u_engine

    threads = set_threads(threads)
    rss_after_imports = peak_rss_bytes()
    features = np.load(directory / "features.npy", mmap_mode="r")  # (N, 512) float32, not read yet
    labels = np.load(directory / "labels.npy")
    flipped = np.load(directory / "flipped.npy")
    start = time.perf_counter()
    report = o2u_engine.score_noise(features, labels, num_classes=NUM_CLASSES, device="cpu")
    seconds = time.perf_counter() - start
    detection = detection_metrics(report.noise_scores, flipped, report.suspected)
    config = report.config
    result = {
        "n": len(labels),
        "seconds": seconds,
        "ru_maxrss_bytes": peak_rss_bytes(),
        "vmhwm_bytes": peak_rss_hwm_bytes(),
        "rss_after_imports_bytes": rss_after_imports,
        "auroc": detection.auroc,
        "precision_at_k": detection.precision_at_k,
        "estimated_noise_rate": report.estimated_noise_rate,
        "model": config.model,
        "epochs": f"{config.pretrain_epochs}+{config.cycle_length_epochs}x{config.num_cycles}",
        "total_epochs": int(config.pretrain_epochs or 0)
        + int(config.cycle_length_epochs or 0) * int(config.num_cycles or 0),
        "batch": f"{config.pretrain_batch_size}/{config.cyclic_batch_size}",
        "timings": report.timings,
        "threads": threads,
    }
    print(json.dumps(result), flush=True)


def run_size(directory: Path, num_samples: int, threads: int) -> dict[str, Any]:
    start = time.perf_counter()
    write_dataset(directory, num_samples)
    print(f"N={num_samples:,}: wrote data in {time.perf_counter() - start:.1f} s", flush=True)
    child = subprocess.run(
        [sys.executable, __file__, "--child", str(directory), "--threads", str(threads)],
        capture_output=True,
        text=True,
        check=False,
    )
    if child.returncode != 0:
        raise SystemExit(f"scoring N={num_samples} failed:\n{child.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"N={num_samples:,}: {json.dumps(result)}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="largest number of samples")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        score_child(args.child, args.threads)
        return
    sizes = sorted({min(10_000, args.n), min(100_000, args.n), args.n})
    results = []
    with tempfile.TemporaryDirectory(prefix="o2u-scale-") as tmp:
        for num_samples in sizes:
            results.append(run_size(Path(tmp), num_samples, args.threads))

    header = [
        "N",
        "model",
        "epochs",
        "batch",
        "wall s",
        "us/sample-epoch",
        "peak RSS GiB",
        "AUROC",
        "P@k",
        "est. rate",
    ]
    rows = [
        [
            f"{r['n']:,}",
            r["model"],
            r["epochs"],
            r["batch"],
            r["seconds"],
            per_sample_epoch(r),
            peak_gib(r),
            r["auroc"],
            r["precision_at_k"],
            r["estimated_noise_rate"],
        ]
        for r in results
    ]
    print(format_table(header, rows))
    largest, middle = results[-1], results[-2] if len(results) > 1 else results[-1]
    print(
        f"summary: n={largest['n']} seconds={largest['seconds']:.1f} peak_rss_gib={peak_gib(largest):.2f} "
        f"auroc={largest['auroc']:.3f} linearity={per_sample_epoch(largest) / per_sample_epoch(middle):.2f} "
        f"(wall time per sample-epoch at n={largest['n']} / at n={middle['n']})"
    )


def per_sample_epoch(result: dict[str, Any]) -> float:
    """Microseconds of wall time per sample per epoch: the cost of the work, whatever the epoch plan."""
    return 1e6 * float(result["seconds"]) / (int(result["n"]) * int(result["total_epochs"]))


def peak_gib(result: dict[str, Any]) -> float:
    return max(int(result["ru_maxrss_bytes"]), int(result["vmhwm_bytes"] or 0)) / GIB


if __name__ == "__main__":
    main()
