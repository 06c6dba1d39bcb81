"""From accumulated cyclic-stage statistics to a ranked noise report.

The score of a sample is its mean normalized loss (`o2u_loss`, the paper's), its negated mean
margin (`aum`), or the mean of its ranks by those two (`loss_margin`: the two orders of the same
run, each sample as suspect as it is on average); ranking is by score. The noise rate and a
per-sample probability come from (rate_estimator picks one by input and score):

- *Separated mixture* (images, the `aum` and `loss_margin` scores): a two-component Gaussian
  mixture fitted to the negated mean margins gives the rate only when its components are clearly
  apart - Ashman's D = sqrt(2) |mean1 - mean0| / sqrt(var0 + var1) of at least 2, the usual bound
  for a clean two-mode split (Ashman, Bird and Zepf, Astron. J. 108, 1994) - and its high group is
  the minority; otherwise the confident disagreement below gives it. Injected noise on a network
  that fits its data separates (digits images with 5-40% noise: D 4.4-6.3, rates within 0.005 of
  the truth); real annotator mistakes on ambiguous samples do not (CIFAR-10N: D 0.2-0.6), nor does
  a clean set (D 1.3).
- *Confident disagreement* (feature vectors, every score; on images the separated mixture's and
  the mixture's fallback): the share of samples in the off-diagonal of the confident joint
  (Northcutt et al., "Confident Learning", JAIR 2021) of the cyclic stage's votes - how often each
  class was predicted for a sample over the cyclic epochs. A class counts for a sample when its
  vote share reaches that class's threshold, the mean share the class gets from the samples
  labeled with it; a sample is flagged when a class other than its given label counts and gets
  more votes than the given label. Plain disagreement (the most-voted class is not the given
  label) counts every clean sample an under-fitted network still gets wrong: on CIFAR-10N (3,000
  images) it gave 0.237, 0.297 and 0.446 for true rates of 0.092, 0.175 and 0.401, where the
  confident count gives 0.115, 0.163 and 0.335 (0.000 on clean digits, 0.071 on CIFAR-10N's clean
  labels). On the digit images it runs low (0.038 to 0.388 for 5 to 40% noise), which is why a
  separated mixture goes first there. The probability is the isotonic fit of the flag against the
  score, so it is non-decreasing in the score and its mean is the rate.
- *Mixture* (images, the `o2u_loss` score): a two-component 1-D Gaussian mixture fitted by EM:
  mislabeled samples keep a high loss, clean ones a low one. Losses are skewed (a long tail of
  hard but clean samples), so the mixture is fitted to the cube root of the shifted scores, the
  Wilson-Hilferty transform that makes gamma-like positive values close to Gaussian: on the
  scikit-learn digits with 5-40% injected noise the rate estimate's error fell from 0.05-0.12 (raw
  scores) to 0.00-0.08. When the fit puts most samples in its high-score group, its weight is no
  noise rate (noise would be the majority; under-trained runs, long-trained clean sets and real
  noise on a network that still under-fits fit that way): the estimate is then flagged `capped`
  and falls back to the confident disagreement. So does a fit whose groups are not apart (D < 2,
  as for the separated mixture; not flagged): on the digit images the fit gave 0.381 for clean
  labels (D 1.8), on 240 clean 4x4 blob images 0.43.

On feature vectors (the MLP) the confident disagreement alone is the estimate, whatever the score.
There the loss mixture put half the samples of clean sets in its high group (0.354 on the digits,
0.465 on 20,000 synthetic vectors) and doubled low rates (0.21 for 10% pair noise on the digits,
0.29 for 5% on synthetic vectors): small-sample or skewed loss distributions split into two groups
that are no clean/noisy split. Over 37 feature sets - CIFAR-10N as embeddings, also long-tailed,
digits and synthetic vectors with injected noise, and clean sets - its mean error was 0.118
against the confident count's 0.059 (`bench/rate_estimators.py --features`), and the margins'
separated mixture, the images' estimate, took 0.266 of the clean digits as noisy and cut pair
noise short (0.08-0.19 for 30% on the digits; mean error 0.068). The count's weakness is a network
that fits every given label (5,000 vectors of 512 dimensions), whose votes see no noise at all.

A score other than the margins that ranks images (`loss_margin`) takes the margins' separated
estimate, its probability fitted isotonically against the ranking score (isotonic_in_score), so
the suspects are the top of the ranking and the rate is the `aum` score's (it was the losses'
mixture, which gave 0.381 for the clean digit images, where the margins' gives 0.000).

The suggested label is the class with the highest mean softmax probability over the cyclic
epochs, and for a suspected sample the highest among the classes other than its given label: a
suspect is one whose given label is believed wrong, so offering it back would fix nothing, and a
reviewer working down the list needs the likeliest alternative. Under instance-dependent noise
(`bench/lookalike_noise.py`) the network often still predicts a look-alike's given label at every
cyclic epoch, so the most-voted class (the suggestion before) offered the given label back for 15%
of the wrong labels in the digit images' top k; the mean probability also ranks the other classes
of a sample the votes never name, and picks the right one more often among those it does (on 1,500
CIFAR-10N images with aggregate labels, the true class for 0.512 of the wrong labels in the top k,
against 0.442 for the votes).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

MIN_SEPARATION = 2.0  # Ashman's D above which a mixture's groups are taken to be two modes
MAX_ESTIMATED_NOISE_RATE = 0.5  # beyond this "noise" would be the majority and the labels meaningless
# EM stops here unconverged only on groups that overlap: on the digit images' margins with 2-10%
# symmetric or pair noise it converged in 6-82 iterations (D 2.7-7.2); of 300 synthetic two-group
# mixtures (normal, gamma and log-normal groups), the 46 that reached the cap stood at D < 2 in 40,
# which the separation test sends to the confident disagreement; 7 of those, small groups far from
# a skewed one, would have separated after 600-1,800 iterations. The cap's cost is 500 passes over
# at most EM_MAX_FIT_SAMPLES values (3.8 s on one CPU core at 200,000).
EM_MAX_ITERATIONS = 500
EM_TOLERANCE = 1e-9  # change in mean log-likelihood per sample
EM_MAX_FIT_SAMPLES = 200_000  # a strided subsample pins five parameters; EM on millions only costs time
ISOTONIC_BINS = 1000  # score bins of the isotonic fit of the confident disagreement's flags
CHUNK_ENTRIES = 1 << 22  # (sample, class) entries a chunk of the per-class reads holds: 32 MiB in float64


@dataclass(frozen=True)
class GaussianMixture1D:
    """Two 1-D Gaussians; component 1 has the higher mean (the "noisy" one)."""

    weights: np.ndarray  # (2,)
    means: np.ndarray  # (2,)
    variances: np.ndarray  # (2,)


def _otsu_threshold(sorted_values: np.ndarray) -> int:
    """Split index maximizing the between-group variance (Otsu), used to start EM deterministically."""
    n = sorted_values.shape[0]
    cumulative = np.cumsum(sorted_values)
    k = np.arange(1, n)
    low_mean = cumulative[:-1] / k
    high_mean = (cumulative[-1] - cumulative[:-1]) / (n - k)
    between = (k / n) * (1 - k / n) * (low_mean - high_mean) ** 2
    return int(np.argmax(between)) + 1


def _component_log_densities(values: np.ndarray, mixture: GaussianMixture1D) -> tuple[np.ndarray, np.ndarray]:
    """log(weight_j * N(value; mean_j, var_j)) for the low (j = 0) and the high component, (N,) each.
    Two flat arrays rather than one (N, 2): reductions over an axis of two cost a pass per row."""
    low, high = (
        np.log(mixture.weights[j])
        - 0.5 * np.log(2 * math.pi * mixture.variances[j])
        - 0.5 * (values - mixture.means[j]) ** 2 / mixture.variances[j]
        for j in (0, 1)
    )
    return low, high


def _posteriors(values: np.ndarray, mixture: GaussianMixture1D) -> tuple[np.ndarray, np.ndarray, float]:
    """(posterior of the low component (N,), of the high one (N,), mean log-likelihood per value)."""
    low, high = _component_log_densities(values, mixture)
    log_total = np.logaddexp(low, high)
    return np.exp(low - log_total), np.exp(high - log_total), float(log_total.mean())


def fit_two_gaussians(values: np.ndarray) -> GaussianMixture1D | None:
    """EM for a two-component mixture; None when the values are (numerically) all equal."""
    values = np.asarray(values, dtype=np.float64)
    spread = float(values.std()) if values.size else 0.0
    if (
        values.size < 4
        or not math.isfinite(spread)
        or spread <= 1e-12 * max(1.0, float(np.abs(values).max()))
    ):
        return None
    variance_floor = 1e-6 * spread**2
    ordered = np.sort(values)
    split = _otsu_threshold(ordered)
    low, high = ordered[:split], ordered[split:]
    mixture = GaussianMixture1D(
        weights=np.array([low.size, high.size], dtype=np.float64) / values.size,
        means=np.array([low.mean(), high.mean()]),
        variances=np.maximum(np.array([low.var(), high.var()]), variance_floor),
    )
    previous = -math.inf
    for _ in range(EM_MAX_ITERATIONS):
        *responsibilities, log_likelihood = _posteriors(values, mixture)
        totals = np.array([r.sum() for r in responsibilities])  # (2,)
        if (totals < 1e-9 * values.size).any():  # a component died: the data is one cluster
            break
        means = np.array([r @ values for r in responsibilities]) / totals
        variances = (
            np.array([r @ (values - m) ** 2 for r, m in zip(responsibilities, means, strict=True)]) / totals
        )
        mixture = GaussianMixture1D(totals / values.size, means, np.maximum(variances, variance_floor))
        if log_likelihood - previous < EM_TOLERANCE:
            break
        previous = log_likelihood
    if mixture.means[0] > mixture.means[1]:
        mixture = GaussianMixture1D(mixture.weights[::-1], mixture.means[::-1], mixture.variances[::-1])
    return mixture


def _monotone_noise_probability(values: np.ndarray, mixture: GaussianMixture1D) -> np.ndarray:
    """Posterior of the high component, made non-decreasing in the value.

    With unequal variances the wider component also wins far out in the *other* tail; a sample
    with a lower score than another must never get a higher probability. Between the two means
    the posterior already increases, so the tails are clamped to its values at the means and a
    running maximum fixes what is left.
    """
    _, probability, _ = _posteriors(values, mixture)
    _, at_means, _ = _posteriors(mixture.means, mixture)
    probability = np.where(values <= mixture.means[0], np.minimum(probability, at_means[0]), probability)
    probability = np.where(values >= mixture.means[1], np.maximum(probability, at_means[1]), probability)
    order = np.argsort(values, kind="stable")
    monotone = np.empty_like(probability)
    monotone[order] = np.maximum.accumulate(probability[order])
    clipped: np.ndarray = np.clip(np.nan_to_num(monotone, nan=0.0), 0.0, 1.0)
    return clipped


class NoiseEstimate(NamedTuple):
    probability: np.ndarray  # (N,) float64 in [0, 1], non-decreasing in the score
    rate: float  # in [0, MAX_ESTIMATED_NOISE_RATE]
    capped: bool  # the mixture's high group held more than the cap: rate and probability are the fallback


def _pool_adjacent_violators(means: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """The non-decreasing sequence closest to `means` (weighted by `sizes`): isotonic regression."""
    pooled: list[tuple[float, float, int]] = []  # (mean, weight, count of inputs)
    for mean, size in zip(means.tolist(), sizes.tolist(), strict=True):
        pooled.append((mean, size, 1))
        while len(pooled) > 1 and pooled[-2][0] > pooled[-1][0]:
            (m1, w1, c1), (m2, w2, c2) = pooled[-2], pooled.pop()
            pooled[-1] = ((m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, c1 + c2)
    fitted: np.ndarray = np.repeat([mean for mean, _, _ in pooled], [count for _, _, count in pooled])
    return fitted


def isotonic_in_score(scores: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The non-decreasing function of the score closest to per-sample `values` in [0, 1] (N,):
    isotonic regression of the values on the score order, in ISOTONIC_BINS equal-count bins (the
    lowest scores first); its mean is the values' mean."""
    count = scores.shape[0]
    bins = min(ISOTONIC_BINS, count)
    order = np.argsort(scores, kind="stable")
    bin_of = np.empty(count, dtype=np.int64)
    bin_of[order] = np.arange(count) * bins // count  # equal-count bins, lowest scores first
    sizes = np.bincount(bin_of, minlength=bins).astype(np.float64)
    means = np.bincount(bin_of, weights=values.astype(np.float64), minlength=bins) / np.maximum(sizes, 1)
    probability: np.ndarray = np.clip(_pool_adjacent_violators(means, sizes)[bin_of], 0.0, 1.0)
    return probability


def _disagreement_estimate(scores: np.ndarray, disagrees: np.ndarray) -> tuple[np.ndarray, float]:
    """(probability, rate) from the flagged samples (`confident_disagreement`): the rate is their
    share, the probability the isotonic fit of the flag against the score."""
    return isotonic_in_score(scores, disagrees), min(float(disagrees.mean()), MAX_ESTIMATED_NOISE_RATE)


def _fit_strided(values: np.ndarray) -> GaussianMixture1D | None:
    """fit_two_gaussians on an evenly strided subsample of at most EM_MAX_FIT_SAMPLES values."""
    stride = max(1, -(-values.size // EM_MAX_FIT_SAMPLES))
    return fit_two_gaussians(values[::stride])


def estimate_noise(
    scores: np.ndarray, disagrees: np.ndarray | None = None, *, min_separation: float = MIN_SEPARATION
) -> NoiseEstimate:
    """Per-sample probability of a wrong label, the estimated noise rate in [0, 0.5], and whether
    the mixture's estimate passed the cap. `disagrees` (N,) bool marks the samples the cyclic stage
    confidently disagrees with (`confident_disagreement`); a capped estimate falls back to them, or,
    without them, stays at the cap, and so does a mixture whose groups are less than
    `min_separation` apart (Ashman's D; not flagged capped). `min_separation` 0 keeps every
    uncapped fit, as this estimate did before the separation test (for comparisons)."""
    scores = np.asarray(scores, dtype=np.float64)
    transformed = np.cbrt(scores - scores.min()) if scores.size else scores
    mixture = _fit_strided(transformed)
    if mixture is None:
        return NoiseEstimate(np.zeros_like(scores), 0.0, False)
    weight = float(np.nan_to_num(mixture.weights[1], nan=0.0))
    capped = weight > MAX_ESTIMATED_NOISE_RATE
    if disagrees is not None and (capped or separation(mixture) < min_separation):
        probability, rate = _disagreement_estimate(scores, np.asarray(disagrees, dtype=bool))
        return NoiseEstimate(probability, rate, capped)
    probability = _monotone_noise_probability(transformed, mixture)
    rate = float(np.clip(weight, 0.0, MAX_ESTIMATED_NOISE_RATE))
    return NoiseEstimate(probability, rate, capped)


def _row_chunks(num_rows: int, num_classes: int) -> Iterator[slice]:
    """Consecutive row slices of an (N, K) array holding at most CHUNK_ENTRIES entries each (at
    least one row)."""
    step = max(1, CHUNK_ENTRIES // max(num_classes, 1))
    for start in range(0, num_rows, step):
        yield slice(start, start + step)


def class_thresholds(prediction_counts: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(K,) float64: each class's threshold of the confident joint, the mean vote share the class
    gets from the samples labeled with it (0 for a class without samples)."""
    counts = np.asarray(prediction_counts)
    labels = np.asarray(labels, dtype=np.int64)
    num_classes = counts.shape[1]
    totals = counts.sum(axis=1, dtype=np.float64)
    own = counts[np.arange(labels.shape[0]), labels] / np.maximum(totals, 1.0)
    sizes = np.bincount(labels, minlength=num_classes).astype(np.float64)
    thresholds: np.ndarray = np.bincount(labels, weights=own, minlength=num_classes) / np.maximum(sizes, 1.0)
    return thresholds


def confident_classes(
    prediction_counts: np.ndarray, labels: np.ndarray, thresholds: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(vote shares (N, K), counts (N, K) bool): each sample's share of the cyclic epochs that
    predicted each class, and whether that share reaches the class's threshold (class_thresholds,
    computed from these rows unless given) - the confident joint's per-class thresholds. A class
    with no votes from its own samples never counts (its threshold would be 0, met by every
    sample), nor does a class with no vote for the sample."""
    counts = np.asarray(prediction_counts, dtype=np.float64)
    if thresholds is None:
        thresholds = class_thresholds(prediction_counts, labels)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    # A share reaches its class's threshold up to rounding: a mean of equal shares may land an ulp above
    reaches = (shares > 0) & (shares >= thresholds[None, :] - 1e-12) & (thresholds[None, :] > 0)
    return shares, reaches


def confident_disagreement(prediction_counts: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(N,) bool: the samples in the off-diagonal of the confident joint of the cyclic stage's
    votes (see the module docstring and confident_classes): another class than the given label
    reaches its threshold and gets more votes than the given label, if that one counts at all; on
    a tie with the given label the given label wins. Computed CHUNK_ENTRIES votes at a time, so
    the float64 shares of a million samples of a thousand classes never exist at once."""
    prediction_counts = np.asarray(prediction_counts)
    labels = np.asarray(labels, dtype=np.int64)
    flagged = np.zeros(labels.shape[0], dtype=bool)
    if labels.shape[0] == 0:
        return flagged
    thresholds = class_thresholds(prediction_counts, labels)
    for chunk in _row_chunks(*prediction_counts.shape):
        chunk_labels = labels[chunk]
        shares, reaches = confident_classes(prediction_counts[chunk], chunk_labels, thresholds)
        rows = np.arange(chunk_labels.shape[0])
        confident = np.where(reaches, shares, -1.0)
        given = confident[rows, chunk_labels].copy()
        confident[rows, chunk_labels] = -1.0
        flagged[chunk] = confident.max(axis=1) > given
    return flagged


def rank_scores(scores: np.ndarray) -> np.ndarray:
    """Ranks (N,) int64, 1 = highest score; equal scores keep sample order."""
    order = np.argsort(-scores, kind="stable")
    ranks = np.empty(scores.shape[0], dtype=np.int64)
    ranks[order] = np.arange(1, scores.shape[0] + 1)
    return ranks


def suspected_mask(ranks: np.ndarray, noise_rate: float) -> np.ndarray:
    """The top round(noise_rate * N) ranks, (N,) bool."""
    count = round(noise_rate * ranks.shape[0])
    mask: np.ndarray = ranks <= count
    return mask


def noise_scores(mean_normalized_losses: np.ndarray) -> np.ndarray:
    """The noise score of each sample, (N,) float64: its mean normalized loss, never NaN or infinite."""
    return np.nan_to_num(
        np.asarray(mean_normalized_losses, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0
    )


@dataclass(frozen=True)
class SuspectedSet:
    """The samples suspected of a wrong label, and the figures that decide them."""

    ranks: np.ndarray  # (N,) int64, 1 = highest score
    noise_probability: np.ndarray  # (N,) float64 in [0, 1]
    estimated_noise_rate: float  # in [0, 0.5]
    noise_rate_used: float  # the given noise rate, else the estimated one
    suspected: np.ndarray  # (N,) bool, the top round(noise_rate_used * N) ranks
    noise_rate_capped: bool = False  # the estimate is estimate_noise's fallback


def separation(mixture: GaussianMixture1D) -> float:
    """Ashman's D of a two-component mixture: how many pooled standard deviations apart its means are."""
    return float(
        math.sqrt(2.0) * abs(mixture.means[1] - mixture.means[0]) / math.sqrt(float(mixture.variances.sum()))
    )


def estimate_separated(scores: np.ndarray, disagrees: np.ndarray) -> NoiseEstimate:
    """The `separated` estimator (see the module docstring): the raw scores' mixture when its
    groups are apart (D >= MIN_SEPARATION) and the high one is the minority, else the confident
    disagreement `disagrees` (N,) bool. Never capped."""
    scores = np.asarray(scores, dtype=np.float64)
    mixture = _fit_strided(scores)
    if (
        mixture is not None
        and separation(mixture) >= MIN_SEPARATION
        and float(mixture.weights[1]) <= MAX_ESTIMATED_NOISE_RATE
    ):
        return NoiseEstimate(_monotone_noise_probability(scores, mixture), float(mixture.weights[1]), False)
    probability, rate = _disagreement_estimate(scores, np.asarray(disagrees, dtype=bool))
    return NoiseEstimate(probability, rate, False)


def rate_estimator(score: str, *, images: bool) -> str:
    """The noise-rate estimator for a score kind and input: on images the margins' mixture when it
    separates, else the samples the cyclic stage confidently disagrees with (`separated`; the
    `aum` and `loss_margin` scores), and the paper's loss its cube-root mixture (`mixture`); on
    feature vectors the confident disagreement whatever the score (`confident`). See the module
    docstring for the evidence."""
    if not images:
        return "confident"
    return "mixture" if score == "o2u_loss" else "separated"


def rate_score(score: str, *, images: bool) -> str:
    """The score kind whose values the rate estimator fits: the margins (`aum`) for every
    `separated` estimate, else the ranking score itself."""
    return "aum" if rate_estimator(score, images=images) == "separated" else score


def suspected_set(
    scores: np.ndarray,
    noise_rate: float,
    disagrees: np.ndarray | None = None,
    *,
    estimator: str = "mixture",
    rate_scores: np.ndarray | None = None,
) -> SuspectedSet:
    """The suspects among noise scores (N,) at `noise_rate`, or at the estimated rate when it is 0
    (`disagrees`: see estimate_noise, needed by the `separated` and `confident` estimators;
    `estimator`: see rate_estimator). With `rate_scores` (N,), another score of the same samples
    (rate_score), the estimator fits those, and its per-sample probability is fitted isotonically
    against `scores`, so the suspects are still the top of the ranking.

    Stage 3 removes exactly the set the report names; both get it from cyclic_suspects."""
    if estimator in ("separated", "confident"):
        if disagrees is None:
            raise ValueError(f"the {estimator} estimator needs the confident disagreement")
        if estimator == "separated":
            fitted = scores if rate_scores is None else rate_scores
            probability, estimated, capped = estimate_separated(fitted, disagrees)
            if rate_scores is not None:
                probability = isotonic_in_score(np.asarray(scores, dtype=np.float64), probability)
        else:
            probability, estimated = _disagreement_estimate(
                np.asarray(scores, dtype=np.float64), np.asarray(disagrees, dtype=bool)
            )
            capped = False
    else:
        probability, estimated, capped = estimate_noise(scores, disagrees)
    used = float(noise_rate) if noise_rate else estimated
    ranks = rank_scores(scores)
    return SuspectedSet(ranks, probability, estimated, used, suspected_mask(ranks, used), capped)


def cyclic_suspects(
    scores: np.ndarray,
    prediction_counts: np.ndarray,
    labels: np.ndarray,
    *,
    score: str,
    images: bool,
    noise_rate: float,
    rate_scores: np.ndarray | None = None,
) -> SuspectedSet:
    """The suspected set of a cyclic stage: its `score` kind's noise scores (N,), vote counts
    (N, K) and given labels (N,) of images or feature vectors at `noise_rate` (0: estimated);
    `rate_scores` are the scores of the rate_score kind when that is not `score`. The report names
    this set and stage 3 removes it."""
    disagrees = confident_disagreement(prediction_counts, labels)
    return suspected_set(
        noise_scores(scores),
        noise_rate,
        disagrees,
        estimator=rate_estimator(score, images=images),
        rate_scores=None if rate_scores is None else noise_scores(rate_scores),
    )


def suggest_labels(
    mean_probabilities: np.ndarray, labels: np.ndarray, suspected: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The suggested label of each sample and its mean probability, from the mean softmax
    probabilities (N, K) of the cyclic epochs (see the module docstring): the likeliest class, a
    tie keeping the given label (else the lowest class); for a `suspected` (N,) sample the likeliest
    class other than its given label, a tie taking the lowest. Read CHUNK_ENTRIES probabilities at
    a time, in float32 (their sums' own precision), so no copy of all of them is made."""
    probabilities = np.asarray(mean_probabilities)
    labels = np.asarray(labels, dtype=np.int64)
    suspected = np.asarray(suspected, dtype=bool)
    suggested = np.empty(labels.shape[0], dtype=np.int64)
    confidence = np.empty(labels.shape[0], dtype=np.float64)
    for chunk in _row_chunks(*probabilities.shape):
        given, suspects = labels[chunk], suspected[chunk]
        rows = np.arange(given.shape[0])
        chunk_probabilities = np.nan_to_num(np.array(probabilities[chunk], dtype=np.float32), nan=0.0)
        likeliest = chunk_probabilities.argmax(axis=1)
        likeliest = np.where(
            chunk_probabilities[rows, given] >= chunk_probabilities[rows, likeliest], given, likeliest
        )
        # A suspect's given label is masked, so it gets the likeliest other class; its suggestion is
        # then never the masked entry, and every probability read below is unmasked.
        chunk_probabilities[rows[suspects], given[suspects]] = -np.inf
        likeliest[suspects] = chunk_probabilities[suspects].argmax(axis=1)
        suggested[chunk] = likeliest
        confidence[chunk] = np.clip(chunk_probabilities[rows, likeliest], 0.0, 1.0)
    return suggested, confidence


def transition_matrix(
    labels: np.ndarray, suggested: np.ndarray, suspected: np.ndarray, num_classes: int
) -> np.ndarray:
    """(K, K) estimated noise transition matrix: row = given label, column = the label believed
    true, each row normalized. A suspected sample counts toward its suggested label, every other
    sample toward its given label, so the diagonal is 1 - that class's noise rate. A class with no
    samples gets the identity row."""
    believed = np.where(suspected, suggested, labels)
    counts = np.zeros((num_classes, num_classes), dtype=np.float64)
    np.add.at(counts, (labels, believed), 1.0)
    totals = counts.sum(axis=1, keepdims=True)
    identity = np.eye(num_classes)
    return np.where(totals > 0, counts / np.maximum(totals, 1.0), identity)


@dataclass(frozen=True)
class NoiseRanking:
    """The per-sample and per-class results computed from the cyclic-stage statistics."""

    noise_scores: np.ndarray
    score_variance: np.ndarray
    suspects: SuspectedSet
    suggested_labels: np.ndarray
    suggested_label_confidence: np.ndarray
    class_counts: np.ndarray
    class_suspected: np.ndarray
    class_noise_rates: np.ndarray
    transition_matrix: np.ndarray


def noise_ranking(
    mean: np.ndarray,
    variance: np.ndarray,
    prediction_counts: np.ndarray,
    mean_probabilities: np.ndarray,
    labels: np.ndarray,
    *,
    num_classes: int,
    noise_rate: float,
    score: str = "o2u_loss",
    images: bool = True,
    rate_scores: np.ndarray | None = None,
) -> NoiseRanking:
    """Everything the report holds per sample and per class; `noise_rate` 0 means estimate it.
    `mean` is the per-sample noise score of the `score` kind before cleaning (see
    CyclicStatistics.scores), `prediction_counts` (N, K) the cyclic stage's votes and
    `mean_probabilities` (N, K) its mean softmax; `images` and `rate_scores` as in cyclic_suspects."""
    scores = noise_scores(mean)
    variance = np.nan_to_num(np.maximum(np.asarray(variance, dtype=np.float64), 0.0), nan=0.0, posinf=0.0)
    suspects = cyclic_suspects(
        scores,
        prediction_counts,
        labels,
        score=score,
        images=images,
        noise_rate=noise_rate,
        rate_scores=rate_scores,
    )
    suggested, confidence = suggest_labels(mean_probabilities, labels, suspects.suspected)
    class_counts = np.bincount(labels, minlength=num_classes).astype(np.int64)
    class_suspected = np.bincount(labels[suspects.suspected], minlength=num_classes).astype(np.int64)
    class_rates = class_suspected / np.maximum(class_counts, 1)
    return NoiseRanking(
        noise_scores=scores,
        score_variance=variance,
        suspects=suspects,
        suggested_labels=suggested,
        suggested_label_confidence=confidence,
        class_counts=class_counts,
        class_suspected=class_suspected,
        class_noise_rates=class_rates.astype(np.float64),
        transition_matrix=transition_matrix(labels, suggested, suspects.suspected, num_classes),
    )
