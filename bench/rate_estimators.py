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
- `loss mixture`: the high group's weight of the cube-root mixture of the mean normalized losses,
  falling back to `confident` when that group is the majority (the `o2u_loss` score's estimator,
  and the `loss_margin` score's on images, before the separation test);
- `separated loss`: the same when its groups are apart (Ashman's D >= 2), else `confident` (the
  `o2u_loss` score's estimator on images now);
- `default`: what the engine reports (the separated mixture, else `confident`): the estimate of
  the `aum` and `loss_margin` scores on images.

Sets: CIFAR-10N with each of its three label sets and its clean labels, and the digits images with
symmetric 5/20/40% and pair 10/30% injected noise, and clean. Usage:
`python bench/rate_estimators.py [--subsample N] [--data PATH] [--threads T]`; the last line is
`summary:` with the mean relative error of each estimator over the noisy CIFAR-10N sets.

`--features` does the same for feature vectors (the MLP and the `loss_margin` score), with the
suspected set's F1 at each estimate (the top `rate x N` of the ranking): CIFAR-10N as 128-d
embeddings (see real_noise_features.py) with each label set and the clean labels, and a long-tailed
subsample of them (x10); digits as 64-d features with the five settings above and noise seeds 0-2,
and clean; synthetic vectors (the generator of feature_plan.py) of 5,000-50,000 samples and 128-512
dimensions, with symmetric 5-40% or pair 10-30% noise, and clean. `margin separated` is the
`default` of images (the margins' mixture when it separates, else `confident`); the engine's
`default` on feature vectors is `confident` for every score. `probability` and `probability
calibrated` are cleanlab's confident joint (uncalibrated and calibrated) read from the mean softmax
probabilities of the cyclic epochs instead of their votes: a class counts for a sample when its
mean probability reaches that class's threshold (the mean probability of the class among the
samples labeled with it), and the sample goes to the counting class it is likeliest in. About 6 minutes
on one core; the last line is `summary:` with each estimator's mean absolute error over all sets
and its mean F1 over the noisy ones and over the CIFAR-10N ones. `--learning-rate R` trains
every set at SGD rate R instead of the defaults (cycles from R down to R / 10), to see how far the
estimates depend on how closely the network fits its data.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
from common import (
    THREADS_HELP,
    NoiseSetting,
    detection_metrics,
    format_table,
    inject_noise,
    load_digits_features,
    load_digits_images,
    set_threads,
    synthetic_features,
)
from real_noise import DEFAULT_DATA, LABEL_SETS, NUM_CLASSES, long_tailed_subsample, stratified_subsample
from real_noise_features import cifar10n_embeddings

import o2u_engine
from o2u_engine import O2UConfig
from o2u_engine.rank import (
    confident_classes,
    confident_disagreement,
    estimate_noise,
    estimate_separated,
    fit_two_gaussians,
    noise_scores,
    rank_scores,
    separation,
)
from o2u_engine.train import Trainer, TrainingOutcome

DIGIT_SETTINGS = (
    NoiseSetting("symmetric", 0.05),
    NoiseSetting("symmetric", 0.2),
    NoiseSetting("symmetric", 0.4),
    NoiseSetting("pair", 0.1),
    NoiseSetting("pair", 0.3),
)
ESTIMATORS = ("plain", "confident", "calibrated", "mixture", "loss mixture", "separated loss", "default")
HEADER = ["set", "true rate", *ESTIMATORS, "D", "time s"]
FEATURE_ESTIMATORS = (
    "plain",
    "confident",
    "calibrated",
    "probability",
    "probability calibrated",
    "loss mixture",
    "margin separated",
    "default",
)
FEATURE_HEADER = ["set", "true rate", *(f"{e} (F1)" for e in FEATURE_ESTIMATORS), "loss D", "AUROC", "time s"]
# (samples, dimensions, noise - None for clean labels, seed of the data and the noise)
SYNTHETIC_SETS = (
    (5_000, 128, NoiseSetting("symmetric", 0.2), 0),
    (5_000, 512, NoiseSetting("symmetric", 0.2), 0),
    (10_000, 128, NoiseSetting("symmetric", 0.05), 0),
    (10_000, 128, NoiseSetting("symmetric", 0.4), 0),
    (10_000, 128, NoiseSetting("pair", 0.1), 1),
    (10_000, 256, NoiseSetting("pair", 0.2), 1),
    (10_000, 512, NoiseSetting("symmetric", 0.2), 0),
    (10_000, 512, None, 0),
    (20_000, 128, NoiseSetting("symmetric", 0.2), 0),
    (20_000, 128, NoiseSetting("pair", 0.3), 0),
    (20_000, 128, None, 1),
    (20_000, 256, NoiseSetting("symmetric", 0.1), 1),
    (20_000, 512, NoiseSetting("pair", 0.1), 0),
    (50_000, 128, NoiseSetting("symmetric", 0.2), 1),
)
LONG_TAIL_RATIO = 10.0
Set = tuple[str, np.ndarray, np.ndarray, np.ndarray]  # (name, samples, given labels, wrong (N,) bool)


class RecordingTrainer(Trainer):
    """The engine's trainer, keeping its outcome for the estimators."""

    last: TrainingOutcome | None = None

    def run(self) -> TrainingOutcome:
        outcome = super().run()
        RecordingTrainer.last = outcome
        return outcome


def plain_disagreement(counts: np.ndarray, labels: np.ndarray) -> float:
    """The share of samples whose most-voted class over the cyclic epochs is not the given label
    (a tie with the given label keeps it)."""
    rows = np.arange(labels.shape[0])
    return float((counts[rows, labels] < counts.max(axis=1)).mean())


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


def probability_joint_rate(probabilities: np.ndarray, labels: np.ndarray, *, calibrated: bool) -> float:
    """1 - trace of cleanlab's confident joint of mean softmax probabilities (N, K), its rows
    calibrated to the label counts when `calibrated` (see the module docstring)."""
    num_classes = probabilities.shape[1]
    sizes = np.bincount(labels, minlength=num_classes).astype(np.float64)
    own = np.bincount(labels, weights=probabilities[np.arange(len(labels)), labels], minlength=num_classes)
    thresholds = np.where(sizes > 0, own / np.maximum(sizes, 1), np.inf)
    reaches = probabilities >= thresholds[None, :] - 1e-12
    assigned = np.where(reaches, probabilities, -1.0).argmax(axis=1)
    counted = reaches.any(axis=1)
    joint = np.zeros((num_classes, num_classes))
    np.add.at(joint, (labels[counted], assigned[counted]), 1.0)
    if calibrated:
        row_totals = joint.sum(axis=1, keepdims=True)
        joint = np.where(row_totals > 0, joint / np.maximum(row_totals, 1) * sizes[:, None], 0.0)
        return float(1.0 - np.trace(joint) / max(joint.sum(), 1.0))
    return float((joint.sum() - np.trace(joint)) / len(labels))  # the counted samples off its diagonal


def estimate_all(
    images: np.ndarray, labels: np.ndarray, config: O2UConfig
) -> tuple[dict[str, float], float, float]:
    """({estimator: rate}, separation D, seconds) of one default run."""
    started = time.perf_counter()
    report = o2u_engine.score_noise(
        images, labels, config=config, num_classes=NUM_CLASSES, _trainer=RecordingTrainer
    )
    seconds = time.perf_counter() - started
    assert RecordingTrainer.last is not None
    statistics = RecordingTrainer.last.statistics
    counts = statistics.prediction_counts.cpu().numpy()
    disagrees = confident_disagreement(counts, labels)
    losses = noise_scores(statistics.mean.cpu().numpy())
    mixture = fit_two_gaussians(report.noise_scores)
    rates = {
        "plain": plain_disagreement(counts, labels),
        "confident": float(disagrees.mean()),
        "calibrated": calibrated_joint_rate(counts, labels),
        "mixture": float(mixture.weights[1]) if mixture is not None else 0.0,
        "loss mixture": estimate_noise(losses, disagrees, min_separation=0.0).rate,
        "separated loss": estimate_noise(losses, disagrees).rate,
        "default": report.estimated_noise_rate,
    }
    return rates, separation(mixture) if mixture is not None else 0.0, seconds


def suspect_f1(wrong: np.ndarray, scores: np.ndarray, rate: float) -> float:
    """F1 of the top round(rate x N) of the ranking against the wrong labels; NaN without any."""
    if not wrong.any():
        return float("nan")
    suspected = rank_scores(scores) <= round(rate * len(scores))
    return float(2 * (suspected & wrong).sum() / (suspected.sum() + wrong.sum()))


def estimate_features(
    vectors: np.ndarray, labels: np.ndarray, config: O2UConfig
) -> tuple[dict[str, float], np.ndarray, float, float]:
    """({estimator: rate}, the default ranking's scores, the loss mixture's D, seconds) of one
    default run on feature vectors."""
    started = time.perf_counter()
    report = o2u_engine.score_noise(
        vectors, labels, config=config, num_classes=NUM_CLASSES, _trainer=RecordingTrainer
    )
    seconds = time.perf_counter() - started
    assert RecordingTrainer.last is not None
    statistics = RecordingTrainer.last.statistics
    counts = statistics.prediction_counts.cpu().numpy()
    probabilities = statistics.mean_probabilities().cpu().numpy()
    disagrees = confident_disagreement(counts, labels)
    losses = noise_scores(statistics.mean.cpu().numpy())
    mixture = fit_two_gaussians(np.cbrt(losses - losses.min()))
    rates = {
        "plain": plain_disagreement(counts, labels),
        "confident": float(disagrees.mean()),
        "calibrated": calibrated_joint_rate(counts, labels),
        "probability": probability_joint_rate(probabilities, labels, calibrated=False),
        "probability calibrated": probability_joint_rate(probabilities, labels, calibrated=True),
        "loss mixture": estimate_noise(losses, disagrees, min_separation=0.0).rate,
        "margin separated": estimate_separated(
            noise_scores(statistics.scores("aum").cpu().numpy()), disagrees
        ).rate,
        "default": report.estimated_noise_rate,
    }
    return rates, report.noise_scores, separation(mixture) if mixture is not None else 0.0, seconds


def training_config(learning_rate: float) -> O2UConfig:
    """The engine's defaults, or with `learning_rate` > 0 those SGD rates instead (for comparisons:
    how far the estimates depend on how closely the network fits its data)."""
    if learning_rate <= 0:
        return O2UConfig()
    return O2UConfig(
        pretrain_learning_rate=learning_rate,
        cycle_max_learning_rate=learning_rate,
        cycle_min_learning_rate=learning_rate / 10,
    )


def feature_sets(data_path: Path) -> list[Set]:
    """The sets of `--features` (see the module docstring); CIFAR-10N's only when its file exists."""
    sets: list[Set] = []
    if data_path.is_file():
        data = np.load(data_path)
        vectors, scored, accuracy = cifar10n_embeddings(data, 30)
        print(f"CIFAR-10N embeddings: {len(vectors)} vectors, encoder accuracy {accuracy:.3f}", flush=True)
        clean = data["y_clean"][scored]
        tail = long_tailed_subsample(clean, LONG_TAIL_RATIO)
        for label_set in LABEL_SETS:
            labels = data[f"y_{label_set}"][scored]
            sets.append((f"cifar10n-embedding-{label_set}", vectors, labels, labels != clean))
        sets.append(("cifar10n-embedding-clean", vectors, clean, np.zeros(len(clean), dtype=bool)))
        for label_set in LABEL_SETS:
            labels = data[f"y_{label_set}"][scored][tail]
            name = f"cifar10n-embedding-longtail{LONG_TAIL_RATIO:.0f}-{label_set}"
            sets.append((name, vectors[tail], labels, labels != clean[tail]))
    else:
        print(f"CIFAR-10N data not found at {data_path}: digits and synthetic sets only", file=sys.stderr)
    digits, digit_labels = load_digits_features()
    for setting in DIGIT_SETTINGS:
        for seed in (0, 1, 2):
            noisy, flipped = inject_noise(digit_labels, setting, NUM_CLASSES, seed=seed)
            sets.append((f"digits-features-{setting.name}-seed{seed}", digits, noisy, flipped))
    sets.append(("digits-features-clean", digits, digit_labels, np.zeros(len(digit_labels), dtype=bool)))
    for samples, dimensions, setting, seed in SYNTHETIC_SETS:
        vectors, labels = synthetic_features(samples, dimensions, NUM_CLASSES, seed=seed)
        name = f"synthetic-{samples}x{dimensions}-{'clean' if setting is None else setting.name}"
        if setting is None:
            sets.append((name, vectors, labels, np.zeros(samples, dtype=bool)))
        else:
            noisy, flipped = inject_noise(labels, setting, NUM_CLASSES, seed=seed)
            sets.append((name, vectors, noisy, flipped))
    return sets


def feature_main(data_path: Path, config: O2UConfig) -> None:
    """`--features`: every estimator on each feature set's default run, with the suspected set's F1."""
    rows: list[list[object]] = []
    errors: dict[str, list[float]] = {name: [] for name in FEATURE_ESTIMATORS}
    f1s: dict[str, list[float]] = {name: [] for name in FEATURE_ESTIMATORS}
    real_f1s: dict[str, list[float]] = {name: [] for name in FEATURE_ESTIMATORS}
    for name, vectors, labels, wrong in feature_sets(data_path):
        rates, scores, distance, seconds = estimate_features(vectors, labels, config)
        true_rate = float(wrong.mean())
        cells: list[object] = [name, true_rate]
        for estimator in FEATURE_ESTIMATORS:
            f1 = suspect_f1(wrong, scores, rates[estimator])
            cells.append(f"{rates[estimator]:.3f}" + ("" if math.isnan(f1) else f" ({f1:.3f})"))
            errors[estimator].append(abs(rates[estimator] - true_rate))
            if not math.isnan(f1):
                f1s[estimator].append(f1)
                if name.startswith("cifar10n"):
                    real_f1s[estimator].append(f1)
        auroc = detection_metrics(scores, wrong).auroc if wrong.any() else float("nan")
        rows.append([*cells, distance, auroc, seconds])
        print("  " + "  ".join(f"{cell:.3f}" if isinstance(cell, float) else str(cell) for cell in rows[-1]))
    print(format_table(FEATURE_HEADER, rows))
    figures = []
    for estimator in FEATURE_ESTIMATORS:
        key = estimator.replace(" ", "_")
        figures.append(f"{key}_abs_error={np.mean(errors[estimator]):.3f}")
        figures.append(f"{key}_f1={np.mean(f1s[estimator]):.3f}")
        if real_f1s[estimator]:
            figures.append(f"{key}_cifar10n_f1={np.mean(real_f1s[estimator]):.3f}")
    print(f"summary: sets={len(rows)} " + " ".join(figures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subsample", type=int, default=3000, help="images of CIFAR-10N to use (0: all)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the cifar10n_10k.npz file")
    parser.add_argument("--features", action="store_true", help="feature vectors instead of images")
    parser.add_argument("--threads", type=int, default=0, help=THREADS_HELP)
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=0.0,
        help="SGD rate of stage 1 and of each cycle's start (its end: a tenth); 0: the engine's defaults",
    )
    args = parser.parse_args()
    threads = set_threads(args.threads)
    config = training_config(args.learning_rate)
    rate = args.learning_rate
    runs = f"one run at SGD rate {rate:g} (cycle end {rate / 10:g})" if rate > 0 else "one default run"
    if args.features:
        print(f"torch threads: {threads}; {runs} per feature set, every estimator on it", flush=True)
        feature_main(args.data, config)
        return
    print(f"torch threads: {threads}; {runs} per set, every estimator on its statistics", flush=True)
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
        rates, distance, seconds = estimate_all(images, labels, config)
        true_rate = float(wrong.mean())
        rows.append([name, true_rate, *(rates[e] for e in ESTIMATORS), distance, seconds])
        print("  " + "  ".join(f"{cell:.3f}" if isinstance(cell, float) else str(cell) for cell in rows[-1]))
        if name.startswith("cifar10n") and true_rate > 0:
            for estimator in ESTIMATORS:
                errors[estimator].append(abs(rates[estimator] - true_rate) / true_rate)
    print(format_table(HEADER, rows))
    if errors["default"]:
        figures = (f"{e.replace(' ', '_')}_rate_error={np.mean(errors[e]):.3f}" for e in ESTIMATORS)
        print("summary: " + " ".join(figures))


if __name__ == "__main__":
    main()
