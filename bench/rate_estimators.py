"""Noise-rate estimators side by side, from the same cyclic-stage statistics.

One default O2U run per set (the engine's image defaults: the `aum` score), then every candidate
estimator on that run's statistics, so the estimators differ only in how they read them:

- `plain`: the share of samples whose most-voted class over the cyclic epochs is not the given
  label (plain disagreement);
- `confident`: the off-diagonal of the confident joint of the cyclic votes
  (`o2u_engine.rank.confident_disagreement`);
- `calibrated`: the same joint calibrated to the label counts, as cleanlab's `confident_joint`
  does before `estimate_joint`;
- `mixture`: the high group's weight of a two-component mixture on the raw scores, with its
  separation (Ashman's D);
- `default`: what the engine reports (the separated mixture, else `confident`).

Sets: CIFAR-10N with each of its three label sets and its clean labels, and the digits images with
symmetric 5/20/40% and pair 10/30% injected noise, and clean. Usage:
`python bench/rate_estimators.py [--subsample N] [--data PATH] [--threads T]`; the last line is
`summary:` with the mean relative error of each estimator over the noisy CIFAR-10N sets.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from common import THREADS_HELP, NoiseSetting, format_table, inject_noise, load_digits_images, set_threads
from real_noise import DEFAULT_DATA, LABEL_SETS, NUM_CLASSES, stratified_subsample

import o2u_engine
from o2u_engine import O2UConfig
from o2u_engine.rank import confident_classes, confident_disagreement, fit_two_gaussians, separation
from o2u_engine.train import Trainer, TrainingOutcome

DIGIT_SETTINGS = (
    NoiseSetting("symmetric", 0.05),
    NoiseSetting("symmetric", 0.2),
    NoiseSetting("symmetric", 0.4),
    NoiseSetting("pair", 0.1),
    NoiseSetting("pair", 0.3),
)
ESTIMATORS = ("plain", "confident", "calibrated", "mixture", "default")
HEADER = ["set", "true rate", *ESTIMATORS, "D", "time s"]


class RecordingTrainer(Trainer):
    """The engine's trainer, keeping its outcome for the estimators."""

    last: TrainingOutcome | None = None

    def run(self) -> TrainingOutcome:
        outcome = super().run()
        RecordingTrainer.last = outcome
        return outcome


def calibrated_joint_rate(counts: np.ndarray, labels: np.ndarray) -> float:
    """1 - trace of the confident joint after calibrating each row to its label count."""
    shares, reaches = confident_classes(counts, labels)
    assigned = np.where(reaches, shares, -1.0).argmax(axis=1)
    confident = reaches.any(axis=1)
    joint = np.zeros((NUM_CLASSES, NUM_CLASSES))
    np.add.at(joint, (labels[confident], assigned[confident]), 1.0)
    sizes = np.bincount(labels, minlength=NUM_CLASSES).astype(np.float64)
    row_totals = joint.sum(axis=1, keepdims=True)
    joint = np.where(row_totals > 0, joint / np.maximum(row_totals, 1) * sizes[:, None], 0.0)
    return float(1.0 - np.trace(joint) / max(joint.sum(), 1.0))


def estimate_all(images: np.ndarray, labels: np.ndarray) -> tuple[dict[str, float], float, float]:
    """({estimator: rate}, separation D, seconds) of one default run."""
    started = time.perf_counter()
    report = o2u_engine.score_noise(
        images, labels, config=O2UConfig(), num_classes=NUM_CLASSES, _trainer=RecordingTrainer
    )
    seconds = time.perf_counter() - started
    assert RecordingTrainer.last is not None
    counts = RecordingTrainer.last.statistics.prediction_counts.cpu().numpy()
    mixture = fit_two_gaussians(report.noise_scores)
    rates = {
        "plain": float((report.suggested_labels != labels).mean()),
        "confident": float(confident_disagreement(counts, labels).mean()),
        "calibrated": calibrated_joint_rate(counts, labels),
        "mixture": float(mixture.weights[1]) if mixture is not None else 0.0,
        "default": report.estimated_noise_rate,
    }
    return rates, separation(mixture) if mixture is not None else 0.0, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subsample", type=int, default=3000, help="images of CIFAR-10N to use (0: all)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the cifar10n_10k.npz file")
    parser.add_argument("--threads", type=int, default=0, help=THREADS_HELP)
    args = parser.parse_args()
    threads = set_threads(args.threads)
    print(f"torch threads: {threads}; one default run per set, every estimator on its statistics", flush=True)
    sets: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []
    if args.data.is_file():
        data = np.load(args.data)
        clean = data["y_clean"]
        keep = stratified_subsample(clean, args.subsample) if args.subsample else np.arange(len(clean))
        for label_set in LABEL_SETS:
            labels = data[f"y_{label_set}"][keep]
            sets.append((f"cifar10n-{label_set}", data["x"][keep], labels, labels != clean[keep]))
        sets.append(("cifar10n-clean", data["x"][keep], clean[keep], np.zeros(len(keep), dtype=bool)))
    else:
        print(f"CIFAR-10N data not found at {args.data}: digits only", file=sys.stderr)
    digits, digit_labels = load_digits_images()
    for setting in DIGIT_SETTINGS:
        noisy, flipped = inject_noise(digit_labels, setting, NUM_CLASSES, seed=0)
        sets.append((f"digits-{setting.name}", digits, noisy, flipped))
    sets.append(("digits-clean", digits, digit_labels, np.zeros(len(digit_labels), dtype=bool)))

    rows: list[list[object]] = []
    errors: dict[str, list[float]] = {name: [] for name in ESTIMATORS}
    for name, images, labels, wrong in sets:
        rates, distance, seconds = estimate_all(images, labels)
        true_rate = float(wrong.mean())
        rows.append([name, true_rate, *(rates[e] for e in ESTIMATORS), distance, seconds])
        print("  " + "  ".join(f"{cell:.3f}" if isinstance(cell, float) else str(cell) for cell in rows[-1]))
        if name.startswith("cifar10n") and true_rate > 0:
            for estimator in ESTIMATORS:
                errors[estimator].append(abs(rates[estimator] - true_rate) / true_rate)
    print(format_table(HEADER, rows))
    if errors["default"]:
        print("summary: " + " ".join(f"{e}_rate_error={np.mean(errors[e]):.3f}" for e in ESTIMATORS))


if __name__ == "__main__":
    main()
