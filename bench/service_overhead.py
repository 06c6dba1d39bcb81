"""Service overhead: the same O2U job run directly with `o2u_engine.score_noise` and through the gRPC
service, alternately, so that the ratio of their wall times means something on a busy machine.

The job: scikit-learn's 1,797 real digits as 64-d features with 20% of the labels flipped (symmetric,
seed 0) in an `.npz` under a temporary data root, seed 0, the default config's choices (an MLP, 18
pre-training epochs, cycles of 5, auto batch sizes) but 40 cycles instead of 3, so that it trains for
about 20 s on one core. Its epochs are short (~0.06 s of CPU), a harsh test of per-epoch costs. The
direct path times `np.load` + `score_noise` in this process. The service path times a server process
of our own on loopback (`python -m o2u_server.main`, started once and warmed up, as in production)
from CreateScoringJob until the WatchScoringJob stream reports SUCCEEDED and every score has been
read back through ListNoiseScores pages. Queueing, storing the results, the notification and the
paging are shown apart, and each run's time inside the engine's epochs (as the engine reports it) is
split from the rest, which exposes per-epoch costs (progress records, checkpoints) even when other
load blurs the totals. The paths alternate (a b, b a, a b, ...) for `--repeats` rounds; the ratio of
the medians and the median of the per-round ratios are printed. Both paths run on the CPU with the
same seed, so their scores must be identical; the run fails (exit 1) if any ranking differs. On a
machine shared with other work, two-thread training stalls unpredictably: `--cpus 1` pins both paths
to one core (and so one torch thread). Usage: `python bench/service_overhead.py [--cpus 1] [--quick]`.

On a GPU, `--device cuda --images 50000` times the job that matters there instead: `cnn9` with the
default config on 50,000 synthetic 32x32 RGB images (20% symmetric noise), the server started with
O2U_DEVICE=cuda. cuDNN's kernels need not be deterministic, so there the rankings are compared by
their Spearman correlation rather than required to be equal (at least 0.99). With `--quick`, an
image job trains 1 + 1 epochs: `--images 64 --quick` checks that path on a CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import load
import numpy as np
import psutil
from common import (
    NoiseSetting,
    detection_metrics,
    format_table,
    inject_noise,
    load_digits_features,
    synthetic_images,
)
from scipy.stats import spearmanr

import o2u_engine
from o2u.v1 import scoring_pb2 as pb
from o2u.v1 import scoring_pb2_grpc

NUM_CLASSES = 10
NOISE = NoiseSetting("symmetric", 0.2)
SEED = 0
TARGET_RATIO = 1.05
JOB_TIMEOUT_S = 900.0
QUICK_CONFIG: dict[str, Any] = {
    "seed": SEED,
    "model": "mlp",
    "pretrain_epochs": 3,
    "cycle_length_epochs": 2,
    "num_cycles": 2,
}
# The default config's choices on the digits (MLP, 18 + 5 x 3 epochs), with 40 cycles instead of 3.
FULL_CONFIG: dict[str, Any] = {
    **QUICK_CONFIG,
    "pretrain_epochs": 18,
    "cycle_length_epochs": 5,
    "num_cycles": 40,
}
# Run once on each path before timing, so neither pays for first-use imports and allocations.
WARMUP_CONFIG: dict[str, Any] = {
    **QUICK_CONFIG,
    "pretrain_epochs": 1,
    "cycle_length_epochs": 1,
    "num_cycles": 1,
}
FINAL = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)


@dataclass
class Run:
    path: str  # "direct" or "service"
    wall_s: float
    cpu_s: float  # this process, plus the server process and its children on the service path
    epochs_s: float  # inside training epochs, as the engine times them (no checkpoints or callbacks)
    scores: np.ndarray  # (N,) float64, by sample id
    ranks: np.ndarray  # (N,) int64, by sample id; 1 = most suspicious
    phases: dict[str, float] = field(default_factory=dict)  # service only, seconds
    epochs: int = 0  # direct only: the resolved config's stage 1 + stage 2 epochs


# The image job on a GPU: cnn9, every other knob the server's (data-dependent) default.
IMAGE_CONFIG: dict[str, Any] = {"seed": SEED, "model": "cnn9"}
IMAGE_WARMUP_CONFIG: dict[str, Any] = {
    **IMAGE_CONFIG,
    "pretrain_epochs": 1,
    "cycle_length_epochs": 1,
    "num_cycles": 1,
}


def write_dataset(path: Path, images: int = 0) -> np.ndarray:
    """The digits (or `images` synthetic 32x32 RGB images) with NOISE applied, as `x`, `y` in an
    .npz; returns the flipped mask."""
    if images:
        features, labels = synthetic_images(images, NUM_CLASSES, seed=SEED)  # (N, 32, 32, 3) uint8
    else:
        features, labels = load_digits_features()  # (N, 64) float32, (N,) int64
    noisy, flipped = inject_noise(labels, NOISE, NUM_CLASSES, seed=SEED)
    np.savez(path, x=features, y=noisy)
    return flipped


def run_direct(dataset: Path, config: dict[str, Any], device: str = "cpu") -> Run:
    cpu_start, start = time.process_time(), time.perf_counter()
    with np.load(dataset) as archive:
        features, labels = archive["x"], archive["y"]
    report = o2u_engine.score_noise(
        features, labels, config=o2u_engine.O2UConfig(**config), num_classes=NUM_CLASSES, device=device
    )
    wall_s, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    epochs_s = sum(report.timings.get(stage, 0.0) for stage in ("pretraining", "cyclic"))
    resolved = report.config
    epochs = resolved.pretrain_epochs + resolved.cycle_length_epochs * resolved.num_cycles
    return Run("direct", wall_s, cpu_s, epochs_s, report.noise_scores, report.ranks, epochs=epochs)


def _cpu_seconds(process: psutil.Process) -> float:
    """The server's CPU time with its descendants': a training process it keeps running (reaped ones
    are in its own `children_*` times)."""
    times = process.cpu_times()
    total = times.user + times.system + times.children_user + times.children_system
    for child in process.children(recursive=True):
        try:
            child_times = child.cpu_times()
        except psutil.NoSuchProcess:  # exited between the listing and the read
            continue
        total += child_times.user + child_times.system
    return float(total)


def _seconds(stamp: Any) -> float:
    return float(stamp.ToNanoseconds()) / 1e9


def run_service(
    stub: scoring_pb2_grpc.ScoringServiceStub,
    server: psutil.Process,
    dataset_uri: str,
    config: dict[str, Any],
    num_samples: int,
    page_size: int,
) -> Run:
    cpu_start = _cpu_seconds(server) + time.process_time()
    start, submitted = time.perf_counter(), time.time()
    request = pb.CreateScoringJobRequest(
        dataset=pb.DatasetRef(uri=dataset_uri), config=pb.ScoringConfig(**config)
    )
    job_id = stub.CreateScoringJob(request, timeout=30).job.job_id
    # The stream replays from the first event, so a job that finished before it opened is still seen.
    stream = stub.WatchScoringJob(pb.WatchScoringJobRequest(job_id=job_id), timeout=JOB_TIMEOUT_S)
    state, ranked, epochs_s = pb.JOB_STATE_UNSPECIFIED, float("nan"), 0.0
    try:
        for response in stream:
            progress = response.event.progress
            if progress.stage in (pb.STAGE_PRETRAINING, pb.STAGE_CYCLIC) and progress.samples_per_second > 0:
                epochs_s += num_samples / progress.samples_per_second  # both stages train on every sample
            if progress.stage == pb.STAGE_RANKING:
                ranked = _seconds(response.event.event_time)  # training done, results not yet stored
            if response.event.state in FINAL:
                state = response.event.state
                break
    finally:
        stream.cancel()  # type: ignore[no-untyped-call]  # grpc stubs leave it untyped
    notified = time.time()
    if state != pb.JOB_STATE_SUCCEEDED:
        job = stub.GetScoringJob(pb.GetScoringJobRequest(job_id=job_id), timeout=30).job
        raise RuntimeError(f"job {job_id} ended {pb.JobState.Name(state)}: {job.error.message}")
    scores = np.full(num_samples, np.nan)
    ranks = np.zeros(num_samples, dtype=np.int64)
    token, pages = "", 0
    while True:
        page_request = pb.ListNoiseScoresRequest(job_id=job_id, page_size=page_size, page_token=token)
        page = stub.ListNoiseScores(page_request, timeout=30)
        pages += 1
        for row in page.noise_scores:
            scores[row.sample_id], ranks[row.sample_id] = row.score, row.rank
        token = page.next_page_token
        if not token:
            break
    wall_s = time.perf_counter() - start
    cpu_s = _cpu_seconds(server) + time.process_time() - cpu_start
    job = stub.GetScoringJob(pb.GetScoringJobRequest(job_id=job_id), timeout=30).job
    if np.isnan(scores).any():
        raise RuntimeError(f"job {job_id}: ListNoiseScores left {int(np.isnan(scores).sum())} samples out")
    created, started, ended = _seconds(job.create_time), _seconds(job.start_time), _seconds(job.end_time)
    phases = {
        "queue": started - created,  # server clock; the client's is the same machine's
        "store": ended - ranked,  # score rows and summary into the job store
        "notify": notified - ended,
        "fetch": wall_s - (notified - submitted),
        "pages": float(pages),
    }
    stub.DeleteScoringJob(pb.DeleteScoringJobRequest(job_id=job_id), timeout=30)
    return Run("service", wall_s, cpu_s, epochs_s, scores, ranks, phases)


@contextmanager
def server_process(
    workdir: Path, data_root: Path, device: str = "cpu"
) -> Iterator[tuple[str, psutil.Process]]:
    """`python -m o2u_server.main` on a free loopback port; yields (address, process)."""
    with load.server_process(workdir, data_root, device) as (address, pid):
        yield address, psutil.Process(pid)


def report(runs: list[Run], flipped: np.ndarray, epochs: int, exact: bool = True) -> tuple[str, bool]:
    """Prints the per-run and median tables; returns the summary line and whether rankings agree
    (`exact`: identical; else a Spearman correlation of at least 0.99 with run 1's scores)."""
    reference = runs[0]
    rows: list[list[object]] = []
    paired: list[float] = []  # service/direct within a round: neighbours share the machine's load
    for index, run in enumerate(runs):
        phase = [run.phases.get(name, float("nan")) for name in ("queue", "store", "notify", "fetch")]
        auroc = detection_metrics(run.scores, flipped).auroc
        same = np.array_equal(run.ranks, reference.ranks)
        ratio = float("nan")
        if run.path == "service":
            ratio = run.wall_s / runs[index - 1].wall_s
            paired.append(ratio)
        times = [run.wall_s, run.cpu_s, run.epochs_s, run.wall_s - run.epochs_s]
        rows.append([index // 2 + 1, run.path, *times, *phase, ratio, auroc, str(same).lower()])
    header = ["round", "path", "wall s", "cpu s", "in epochs s", "outside epochs s", "queue s", "store s"]
    header += ["notify s", "fetch s"]
    print(format_table([*header, "service/direct", "AUROC", "same ranks as run 1"], rows))
    medians: dict[str, list[float]] = {}  # path -> medians of wall, cpu, in epochs, outside epochs
    for path in ("direct", "service"):
        chosen = [run for run in runs if run.path == path]
        columns = [[run.wall_s, run.cpu_s, run.epochs_s, run.wall_s - run.epochs_s] for run in chosen]
        medians[path] = [statistics.median(column) for column in zip(*columns, strict=True)]
    direct_s, direct_cpu = medians["direct"][:2]
    service_s, service_cpu = medians["service"][:2]
    ratio, cpu_ratio = service_s / direct_s, service_cpu / direct_cpu
    print()
    header = ["path", "median wall s", "cpu s", "in epochs s", "outside epochs s"]
    print(format_table(header, [[path, *values] for path, values in medians.items()]))
    max_diff = max(float(np.max(np.abs(run.scores - reference.scores))) for run in runs)
    spearman = min(float(spearmanr(run.scores, reference.scores).statistic) for run in runs)
    same_ranking = all(np.array_equal(run.ranks, reference.ranks) for run in runs)
    agree = same_ranking if exact else spearman >= 0.99
    verdict = "met" if ratio <= TARGET_RATIO else "missed"
    paired_ratio = statistics.median(paired)
    print(f"\nservice/direct: wall {ratio:.3f} (target <= {TARGET_RATIO}: {verdict}), cpu {cpu_ratio:.3f}")
    print(f"median of the per-round ratios: {paired_ratio:.3f}")
    extra = medians["service"][3] - medians["direct"][3]  # less sensitive to other load than wall time
    per_epoch = f"{extra / epochs * 1e3:.1f} ms each, fixed costs included"
    print(f"service time outside the engine's epochs: +{extra:.2f} s over {epochs} epochs ({per_epoch})")
    print(f"largest score difference from run 1: {max_diff:.3g}; lowest Spearman correlation: {spearman:.4f}")
    summary = (
        f"summary: direct_s={direct_s:.2f} service_s={service_s:.2f} ratio={ratio:.3f} "
        f"same_ranking={str(same_ranking).lower()} paired_ratio={paired_ratio:.3f} cpu_ratio={cpu_ratio:.3f} "
        f"outside_epochs_s=+{extra:.2f} max_score_diff={max_diff:.3g} min_spearman={spearman:.4f}"
    )
    return summary, agree


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="rounds of one run per path (default 3)")
    parser.add_argument("--quick", action="store_true", help="a 7-epoch config (seconds per run)")
    parser.add_argument("--page-size", type=int, default=1000, help="ListNoiseScores page size")
    parser.add_argument(
        "--cpus", type=int, help="pin both paths to this many of the allowed CPUs (default: all of them)"
    )
    parser.add_argument("--device", default="cpu", help="torch device of both paths: cpu (default) or cuda")
    parser.add_argument(
        "--images", type=int, default=0, help="score N synthetic 32x32 RGB images with cnn9 (0: the digits)"
    )
    args = parser.parse_args(argv)
    config = QUICK_CONFIG if args.quick else FULL_CONFIG
    warmup = WARMUP_CONFIG
    if args.images:  # --quick: the warm-up's 1 + 1 epochs, to check the image path
        config, warmup = (IMAGE_WARMUP_CONFIG if args.quick else IMAGE_CONFIG), IMAGE_WARMUP_CONFIG
    if args.cpus:
        # The server inherits the affinity and sizes its torch threads from it, like the direct path.
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cpus])
    threads = o2u_engine.configure_cpu_threads()  # what the server does at start-up
    with tempfile.TemporaryDirectory(prefix="o2u-overhead-") as tmp:
        workdir = Path(tmp)
        data_root = workdir / "data"
        data_root.mkdir()
        dataset = data_root / ("images-noisy.npz" if args.images else "digits-noisy.npz")
        flipped = write_dataset(dataset, args.images)
        num_samples = len(flipped)
        kind = "32x32 RGB images" if args.images else "digits"
        print(
            f"dataset: {num_samples} {kind}, {NOISE.name} noise; config {config}; device {args.device}; "
            f"torch threads {threads}",
            flush=True,
        )
        runs: list[Run] = []
        with (
            server_process(workdir, data_root, args.device) as (address, server),
            grpc.insecure_channel(address) as channel,
        ):
            stub = scoring_pb2_grpc.ScoringServiceStub(channel)

            def service(job_config: dict[str, Any]) -> Run:
                return run_service(stub, server, dataset.as_uri(), job_config, num_samples, args.page_size)

            run_direct(dataset, warmup, args.device)
            service(warmup)
            for round_index in range(args.repeats):
                order = ("direct", "service") if round_index % 2 == 0 else ("service", "direct")
                done: dict[str, Run] = {}
                for path in order:
                    done[path] = (
                        run_direct(dataset, config, args.device) if path == "direct" else service(config)
                    )
                    pages = f" ({done[path].phases['pages']:.0f} score pages)" if path == "service" else ""
                    print(f"round {round_index + 1} {path}: {done[path].wall_s:.2f} s{pages}", flush=True)
                runs += [done["direct"], done["service"]]  # the table reads the same way every round
        print()
        summary, agree = report(runs, flipped, runs[0].epochs, exact=args.device == "cpu")
    print(summary)
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
