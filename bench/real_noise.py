"""Detection quality on real, human-made label noise: O2U against cleanlab, small loss and AUM.

CIFAR-10N (10,000 CIFAR-10 training images with labels from Amazon Mechanical Turk workers, see
the data folder's README) with each of its three label sets - aggregate (~9% wrong), random1
(~18%) and worst (~40%) - and, to keep the synthetic wins in view, scikit-learn's digits as 8x8
images with symmetric 20% and pair 30% injected noise. Every method trains the engine's default
network with the engine's default recipe and epoch budget per training (see baselines.py): O2U
with its defaults (and the paper's `o2u_loss` score from the same run's statistics, retrained),
cleanlab 2.x with 5-fold cross-validated probabilities (`find_label_issues` and
`get_label_quality_scores`), small loss after stage 1 and AUM over a plain run. Reported per set:
AUROC, AP, precision@k (k = true number of wrong labels), recall in the top 1% and 5%, F1 of the
method's own suspected set (no oracle rate), estimated vs true noise rate, the share of the wrong
labels whose suggested label is the true one (O2U's suggestion; cleanlab's out-of-fold argmax),
over all of them (`fix`) and over those the method ranks in its top k (`fix@k`), wall time.

Usage: `python bench/real_noise.py [--quick] [--subsample N | --long-tail R] [--label-sets LIST]
[--device cuda] [--data PATH]`; `--quick` scores only the aggregate label set on a stratified
1,500-image subsample and skips the extra o2u_loss training. `--long-tail R` keeps a long-tailed
subsample instead, as moderation and tagging data are: the classes, in a seeded random order,
keep 1,000 images down to 1,000 / R, geometrically. The last line is `summary:` over the CIFAR-10N
sets.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

ROOT = Path(__file__).resolve().parent.parent
# ../shared/data relative to the repository root (a checkout's own shared/ folder also counts)
DATA_CANDIDATES = (
    ROOT / ".." / "shared" / "data" / "cifar10n_10k.npz",
    ROOT / "shared" / "data" / "cifar10n_10k.npz",
)
DEFAULT_DATA = next((path for path in DATA_CANDIDATES if path.is_file()), DATA_CANDIDATES[0])
LABEL_SETS = ("aggregate", "random1", "worst")
DIGIT_SETTINGS = (NoiseSetting("symmetric", 0.2), NoiseSetting("pair", 0.3))
QUICK_SUBSAMPLE = 1500
NUM_CLASSES = 10
HEADER = [
    "set",
    "method",
    "AUROC",
    "AP",
    "P@k",
    "R@1%",
    "R@5%",
    "F1",
    "est. rate",
    "true rate",
    "fix",
    "fix@k",
    "time s",
]


@dataclass(frozen=True)
class Row:
    data_set: str
    method: str
    detection: Detection
    recall_1: float
    recall_5: float
    fix_accuracy: float  # share of the wrong labels whose suggestion is the true label; NaN: none
    fix_at_k: float  # the same share among the wrong labels in the top k (k = number wrong)
    seconds: float

    def cells(self) -> list[object]:
        d = self.detection
        return [
            self.data_set,
            self.method,
            d.auroc,
            d.average_precision,
            d.precision_at_k,
            self.recall_1,
            self.recall_5,
            d.f1,
            d.estimated_noise_rate,
            d.true_noise_rate,
            self.fix_accuracy,
            self.fix_at_k,
            self.seconds,
        ]


def recall_in_top(suspicion: np.ndarray, wrong: np.ndarray, fraction: float) -> float:
    """Share of the wrong labels among the top `fraction` of samples by suspicion."""
    count = max(1, round(fraction * len(wrong)))
    top = np.argsort(-np.asarray(suspicion, dtype=np.float64), kind="stable")[:count]
    return float(wrong[top].sum() / max(int(wrong.sum()), 1))


def fix_accuracy(
    suggested: np.ndarray | None, suspicion: np.ndarray, clean: np.ndarray, wrong: np.ndarray
) -> tuple[float, float]:
    """Share of the wrong labels whose suggestion is the true label: over all of them, and over
    those ranked in the top k by `suspicion` (k = the number of wrong labels), the ones a reviewer
    going down the ranking would see. NaN for a method without suggestions."""
    if suggested is None or not wrong.any():
        return float("nan"), float("nan")
    right = np.asarray(suggested) == clean
    top = np.zeros(len(wrong), dtype=bool)
    top[np.argsort(-np.asarray(suspicion, dtype=np.float64), kind="stable")[: int(wrong.sum())]] = True
    seen = top & wrong
    return float(right[wrong].mean()), float(right[seen].mean()) if seen.any() else float("nan")


def row(  # type: ignore[no-untyped-def]
    name: str,
    method: str,
    suspicion: np.ndarray,
    wrong: np.ndarray,
    suspected,
    seconds: float,
    suggested: np.ndarray | None = None,
    clean: np.ndarray | None = None,
) -> Row:
    fix, fix_at_k = (
        fix_accuracy(suggested, suspicion, clean, wrong) if clean is not None else (float("nan"),) * 2
    )
    return Row(
        name,
        method,
        detection_metrics(suspicion, wrong, suspected),
        recall_in_top(suspicion, wrong, 0.01),
        recall_in_top(suspicion, wrong, 0.05),
        fix,
        fix_at_k,
        seconds,
    )


def run_set(
    name: str,
    images: np.ndarray,
    labels: np.ndarray,
    clean: np.ndarray,
    device: str,
    paper_score: bool,
    *,
    num_classes: int = NUM_CLASSES,
) -> list[Row]:
    """Every method on one labelled set (`clean`: the true labels) of `num_classes` classes, with
    the same network and budget per training (`paper_score`: also O2U with the paper's o2u_loss
    score, one more training)."""
    wrong = labels != clean
    with stopwatch() as o2u_seconds:
        report = o2u_engine.score_noise(
            images, labels, config=O2UConfig(), num_classes=num_classes, device=device
        )
    rows = [
        row(
            name,
            f"o2u ({report.config.score})",
            report.noise_scores,
            wrong,
            report.suspected,
            o2u_seconds[0],
            report.suggested_labels,
            clean,
        )
    ]
    print(
        f"  {name}: o2u config {report.config.model}, augment {report.config.augment}, "
        f"lr {report.config.pretrain_learning_rate}/{report.config.cycle_max_learning_rate}-"
        f"{report.config.cycle_min_learning_rate}, epochs {report.config.pretrain_epochs} + "
        f"{report.config.cycle_length_epochs}x{report.config.num_cycles}; rate estimate "
        f"{report.estimated_noise_rate:.3f} ({mixture_note(report.noise_scores)}), true {wrong.mean():.3f}",
        flush=True,
    )
    show(rows[-1])
    if paper_score:
        with stopwatch() as paper_seconds:
            paper = o2u_engine.score_noise(
                images, labels, config=O2UConfig(score="o2u_loss"), num_classes=num_classes, device=device
            )
        rows.append(
            row(
                name,
                "o2u (o2u_loss)",
                paper.noise_scores,
                wrong,
                paper.suspected,
                paper_seconds[0],
                paper.suggested_labels,
                clean,
            )
        )
        show(rows[-1])
    baselines = BaselineTrainer(images, labels, num_classes, report.config, device=device)
    cleanlab = baselines.cleanlab(folds=5)
    rows.append(
        row(
            name,
            "cleanlab",
            cleanlab.suspicion,
            wrong,
            cleanlab.suspected,
            cleanlab.seconds,
            cleanlab.pred_probs.argmax(axis=1),
            clean,
        )
    )
    show(rows[-1])
    plain = baselines.plain_run()
    rows.append(row(name, "small-loss", plain.stage1_losses, wrong, None, plain.stage1_seconds))
    rows.append(row(name, "aum", -plain.mean_margins, wrong, None, plain.seconds))
    show(rows[-2])
    show(rows[-1])
    return rows


def mixture_note(scores: np.ndarray) -> str:
    """The raw-score mixture the `separated` estimator weighs: its high group's weight and its
    separation (Ashman's D; below 2 the votes give the rate instead)."""
    mixture = o2u_engine.rank.fit_two_gaussians(scores)
    if mixture is None:
        return "scores all equal"
    return f"score mixture: weight {mixture.weights[1]:.3f}, D {o2u_engine.rank.separation(mixture):.2f}"


def show(r: Row) -> None:
    """One method's figures, as soon as they are known."""
    d = r.detection
    print(
        f"    {r.method:15} auroc {d.auroc:.3f} ap {d.average_precision:.3f} "
        f"p@k {d.precision_at_k:.3f} f1 {d.f1:.3f} est {d.estimated_noise_rate:.3f} "
        f"fix {r.fix_accuracy:.3f} fix@k {r.fix_at_k:.3f} {r.seconds:7.1f} s",
        flush=True,
    )


def load_cifar10n(path: Path) -> Any:
    """The CIFAR-10N file's arrays (an NpzFile), or exit 0 with a "skipped" line when it is missing."""
    if not path.is_file():
        print(f"skipped: CIFAR-10N data not found at {path} (pass --data PATH)")
        sys.exit(0)
    return np.load(path)


def long_tailed_subsample(labels: np.ndarray, ratio: float, seed: int = 0) -> np.ndarray:
    """Indices of a long-tailed subsample in their original order: the classes, in a random order,
    keep the smallest class's count down to that count / `ratio`, geometrically."""
    rng = np.random.default_rng(seed)
    head = int(np.bincount(labels, minlength=NUM_CLASSES).min())  # what the first class keeps
    chosen = []
    for rank, label in enumerate(rng.permutation(NUM_CLASSES)):
        count = round(head * ratio ** (-rank / (NUM_CLASSES - 1)))
        chosen.append(rng.choice(np.flatnonzero(labels == label), count, replace=False))
    return np.sort(np.concatenate(chosen))


def stratified_subsample(labels: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """Indices of `size` samples, the same share of every clean class, in their original order."""
    rng = np.random.default_rng(seed)
    per_class = size // NUM_CLASSES
    chosen = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(NUM_CLASSES)]
    return np.sort(np.concatenate(chosen))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="aggregate labels only, 1,500-image subsample")
    parser.add_argument("--subsample", type=int, default=0, help="images of CIFAR-10N to use (0: all)")
    parser.add_argument(
        "--long-tail",
        type=float,
        default=0.0,
        help="keep a long-tailed subsample, largest / smallest class R",
    )
    parser.add_argument("--label-sets", default="", help="comma-separated, of: " + ", ".join(LABEL_SETS))
    parser.add_argument("--device", default="cpu", help="torch device: cpu (default) or cuda")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the cifar10n_10k.npz file")
    parser.add_argument("--no-digits", action="store_true", help="skip the digits sets")
    parser.add_argument("--threads", type=int, default=0, help=THREADS_HELP)
    args = parser.parse_args()
    data = load_cifar10n(args.data)
    threads = set_threads(args.threads)
    images, clean = data["x"], data["y_clean"]
    if args.long_tail and args.subsample:
        parser.error("--long-tail and --subsample each choose the images: give one")
    subsample = args.subsample or (QUICK_SUBSAMPLE if args.quick and not args.long_tail else 0)
    if args.long_tail:
        keep = long_tailed_subsample(clean, args.long_tail)
    else:
        keep = stratified_subsample(clean, subsample) if subsample else np.arange(len(clean))
    label_sets = [s for s in args.label_sets.split(",") if s] or (
        LABEL_SETS[:1] if args.quick else LABEL_SETS
    )
    unknown = sorted(set(label_sets) - set(LABEL_SETS))
    if unknown:
        parser.error(f"unknown label sets {', '.join(unknown)}; expected some of {', '.join(LABEL_SETS)}")
    print(f"machine: {machine_description()}; torch threads: {threads}; device {args.device}")
    print(
        f"data: CIFAR-10N {len(keep)} of {len(clean)} images"
        + (" (stratified subsample)" if subsample else "")
        + (f" (long-tailed, per class {np.bincount(clean[keep]).tolist()})" if args.long_tail else "")
        + f", label sets {', '.join(label_sets)}; "
        + f"digits {'skipped' if args.no_digits else 'symmetric-20%, pair-30%'}",
        flush=True,
    )
    began = time.perf_counter()
    rows: list[Row] = []
    for label_set in label_sets:
        labels = data[f"y_{label_set}"][keep]
        rows += run_set(
            f"cifar10n-{label_set}", images[keep], labels, clean[keep], args.device, not args.quick
        )
    if not args.no_digits:
        digits, digit_labels = load_digits_images()
        for setting in DIGIT_SETTINGS:
            noisy, _ = inject_noise(digit_labels, setting, NUM_CLASSES, seed=0)
            rows += run_set(
                f"digits-{setting.name}", digits, noisy, digit_labels, args.device, not args.quick
            )
    print(f"\nk = true number of wrong labels; total {time.perf_counter() - began:.0f} s")
    print(format_table(HEADER, [r.cells() for r in rows]))
    summary(rows)


def summary(rows: list[Row], auroc_margin: float = 0.01) -> None:
    """The targets per CIFAR-10N set (O2U's AUROC at least cleanlab's + `auroc_margin`, its AP at
    least cleanlab's) and the `summary:` line; `paper_auroc` when the o2u_loss runs are there."""
    cifar = [r for r in rows if r.data_set.startswith("cifar10n")]
    o2u = [r for r in cifar if r.method.startswith("o2u (") and r.method != "o2u (o2u_loss)"]
    paper = [r for r in cifar if r.method == "o2u (o2u_loss)"]
    cleanlab = [r for r in cifar if r.method == "cleanlab"]
    for mine, theirs in zip(o2u, cleanlab, strict=True):
        ok = (
            mine.detection.auroc >= theirs.detection.auroc + auroc_margin
            and mine.detection.average_precision >= theirs.detection.average_precision
        )
        print(
            f"target {mine.data_set}: O2U AUROC >= cleanlab's + {auroc_margin:g} and AP >= cleanlab's: "
            + ("yes" if ok else "no")
        )

    def mean(group: list[Row], field: str) -> float:
        return float(np.mean([getattr(r.detection, field) for r in group]))

    rate_error = float(
        np.mean(
            [
                abs(r.detection.estimated_noise_rate - r.detection.true_noise_rate)
                / r.detection.true_noise_rate
                for r in o2u
            ]
        )
    )
    ratio = float(np.mean([r.seconds for r in o2u]) / np.mean([r.seconds for r in cleanlab]))
    o2u_fix = float(np.mean([r.fix_at_k for r in o2u]))
    cleanlab_fix = float(np.mean([r.fix_at_k for r in cleanlab]))
    paper_note = f"paper_auroc={mean(paper, 'auroc'):.3f} " if paper else ""
    print(
        f"summary: o2u_auroc={mean(o2u, 'auroc'):.3f} {paper_note}"
        f"cleanlab_auroc={mean(cleanlab, 'auroc'):.3f} "
        f"o2u_ap={mean(o2u, 'average_precision'):.3f} cleanlab_ap={mean(cleanlab, 'average_precision'):.3f} "
        f"rate_error={rate_error:.3f} o2u_fix_at_k={o2u_fix:.3f} cleanlab_fix_at_k={cleanlab_fix:.3f} "
        f"time_ratio={ratio:.3f}"
    )


if __name__ == "__main__":
    main()
