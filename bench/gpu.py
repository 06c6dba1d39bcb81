"""GPU throughput of full O2U runs: cnn9 and resnet18 on CIFAR-sized images, the MLP at a million.

One prepared script for a CUDA machine, sized to finish in under 8 minutes on an H200 (`--budget S`:
the later, less wanted parts are skipped when S seconds run short). It scores a synthetic 50,000 x
32 x 32 x 3 uint8 set (10 classes, 20% symmetric noise) with `cnn9` and `resnet18`, and 1,000,000 x
512 float32 features with the MLP, each a full default O2U run (stage 1 + cyclic stage); prints wall
time, training samples/s (all epochs, and the median of the cyclic epochs after the first, i.e. the
small-batch stage once warm), peak device memory and AUROC. On short cnn9 runs it compares fp32 with
bf16 autocast, cuDNN's autotuner (`torch.backends.cudnn.benchmark`) off/on, larger batches, and
torch.compile off/on, also in its CUDA-graph mode (`compile_mode="reduce-overhead"`); and it times
bare cnn9 steps eager against one CUDA graph per step. cnn9 costs 4.47 GFLOP per training sample at
32 px, so 40,000 samples/s is about 179 TFLOP/s. Then it runs the GPU-marked tests. A run that fails
is reported and the script goes on, so one bad variant never costs the others. It imports only
torch, NumPy, scikit-learn and the engine: `PYTHONPATH=. python bench/gpu.py`. Without a CUDA device
it says so and exits 0; `--smoke` runs the same steps, tiny, on the CPU to check the script itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import re
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import (
    NoiseSetting,
    detection_metrics,
    format_table,
    inject_noise,
    machine_description,
    synthetic_features,
    synthetic_images,
)

import o2u_engine
from o2u_engine import O2UConfig, ProgressEvent

NOISE = NoiseSetting("symmetric", 0.2)
NUM_CLASSES = 10
SEED = 0
GIB = 1024**3
BUDGET_SECONDS = 8 * 60  # the whole script; optional parts are skipped when it runs short
REPO = Path(__file__).resolve().parent.parent
NAN = float("nan")


@dataclass
class Run:
    name: str
    setup: str  # epochs, batch sizes, precision
    seconds: float
    samples_per_second: float  # all training samples of the run / its training time
    cyclic_samples_per_second: float  # median over cyclic epochs, the first excluded (warm-up)
    peak_memory_gib: float
    auroc: float


def full_run(
    name: str,
    features: np.ndarray,
    labels: np.ndarray,
    flipped: np.ndarray,
    config: O2UConfig,
    device: str,
    *,
    cudnn_benchmark: bool = False,
) -> Run:
    events: list[ProgressEvent] = []
    torch.backends.cudnn.benchmark = cudnn_benchmark  # process-wide: set for this run only
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        report = o2u_engine.score_noise(
            features, labels, config=config, num_classes=NUM_CLASSES, device=device, progress=events.append
        )
    except Exception as error:  # report it and keep measuring the rest
        traceback.print_exc()
        print(f"  {name}: FAILED ({type(error).__name__}: {error})", flush=True)
        return Run(name, "failed", time.perf_counter() - start, NAN, NAN, NAN, NAN)
    finally:
        torch.backends.cudnn.benchmark = False
    seconds = time.perf_counter() - start
    c = report.config
    assert c.pretrain_epochs is not None
    assert c.cycle_length_epochs is not None
    assert c.num_cycles is not None
    epochs = c.pretrain_epochs + c.cycle_length_epochs * c.num_cycles
    training_seconds = report.timings.get("pretraining", 0.0) + report.timings.get("cyclic", 0.0)
    cyclic = [e.samples_per_second for e in events if e.stage == "cyclic"][1:] or [NAN]
    run = Run(
        name=name,
        setup=f"{c.pretrain_epochs}+{c.cycle_length_epochs}x{c.num_cycles} ep, "
        f"b{c.pretrain_batch_size}/{c.cyclic_batch_size}, {c.precision}, {c.data_placement}"
        + (f", compiled ({c.compile_mode})" if c.compile_model else "")
        + (", cudnn.benchmark" if cudnn_benchmark else ""),
        seconds=seconds,
        samples_per_second=epochs * len(labels) / max(training_seconds, 1e-9),
        cyclic_samples_per_second=statistics.median(cyclic),
        peak_memory_gib=torch.cuda.max_memory_allocated() / GIB if cuda else NAN,
        auroc=detection_metrics(report.noise_scores, flipped).auroc,
    )
    print(f"  {run}", flush=True)
    return run


def step_rates(batch: int, device: str, steps: int, bf16: bool = True) -> tuple[float, float]:
    """Training steps/s of bare cnn9 (bf16 autocast unless `bf16` is False, channels_last, SGD) at
    `batch`: eager, and the whole step (forward, backward, optimizer) captured once as a CUDA graph
    and replayed (NaN on a CPU). The gap is what per-step overhead costs the engine's eager loop at
    this batch size."""
    model = o2u_engine.build_model("cnn9", in_channels=3, num_classes=NUM_CLASSES, image_size=32)
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, foreach=True)
    inputs = torch.randn(batch, 3, 32, 32, device=device).to(memory_format=torch.channels_last)
    targets = torch.randint(0, NUM_CLASSES, (batch,), device=device)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        # No autocast weight cache: a captured graph must not keep casts from the capture run.
        with torch.autocast(
            torch.device(device).type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False
        ):
            logits = model(inputs)  # (B, K)
        loss = F.cross_entropy(logits.float(), targets)
        loss.backward()
        optimizer.step()
        return loss

    def rate(run: Callable[[], object]) -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            run()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return steps / (time.perf_counter() - start)

    side = torch.cuda.Stream() if device.startswith("cuda") else None
    if side is not None:  # warm up on a side stream, as whole-network capture requires
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
    else:
        step()
    eager = rate(step)
    if side is None:
        return eager, NAN
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        step()
    return eager, rate(graph.replay)


def run_gpu_tests(timeout: float) -> str:
    if importlib.util.find_spec("pytest") is None:
        print("pytest is not installed: GPU-marked tests skipped")
        return "skipped"
    # Config warnings (e.g. the `timeout` ini key when pytest-timeout is missing) must not abort.
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
    command += ["-W", "ignore::pytest.PytestConfigWarning", "tests/o2u_engine"]
    print("$ " + " ".join(command[1:]), flush=True)
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        print(f"GPU tests did not finish within {timeout:.0f} s")
        return "timeout"
    print(done.stdout[-3000:] + done.stderr[-2000:])
    counts = re.findall(
        r"(\d+) (passed|failed|skipped|errors?)",
        done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "",
    )
    outcome = ",".join(f"{number}_{word}" for number, word in counts) or "no_tests"
    return outcome if done.returncode in (0, 5) else f"{outcome}(rc={done.returncode})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks the script only")
    parser.add_argument(
        "--budget",
        type=float,
        default=BUDGET_SECONDS,
        help=f"seconds for the whole script; later parts are skipped when it runs short ({BUDGET_SECONDS})",
    )
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        print("bench/gpu.py: no CUDA device (torch.cuda.is_available() is False); nothing to measure.")
        return
    began = time.perf_counter()
    device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        torch.set_num_threads(1)
    print(machine_description(), flush=True)
    num_images, num_vectors = (64, 2_048) if args.smoke else (50_000, 1_000_000)
    short = O2UConfig(pretrain_epochs=1, cycle_length_epochs=2, num_cycles=1)  # A/B runs, and --smoke
    default = short if args.smoke else O2UConfig()

    images, clean = synthetic_images(num_images, NUM_CLASSES, seed=SEED)  # (N, 32, 32, 3) uint8
    labels, flipped = inject_noise(clean, NOISE, NUM_CLASSES, seed=SEED)
    print(f"data: {images.shape} uint8 images in {time.perf_counter() - began:.1f} s", flush=True)
    # Warm-up: CUDA context, cuDNN heuristics, allocator pools - so the first timed run is fair.
    warm = min(2_048, num_images)
    full_run(
        "warm-up",
        images[:warm],
        labels[:warm],
        flipped[:warm],
        dataclasses.replace(short, model="cnn9"),
        device,
    )

    runs: list[Run] = []

    def time_left() -> float:
        return args.budget - (time.perf_counter() - began)

    def run_if_time(name: str, reserve: float, run: Callable[[], Run]) -> None:
        """`run()`, or a skipped row when less than `reserve` seconds of the budget are left."""
        if time_left() < reserve:
            print(f"  {name}: skipped, {time_left():.0f} s of the budget left", flush=True)
            runs.append(Run(name, "skipped", NAN, NAN, NAN, NAN, NAN))
        else:
            runs.append(run())

    # Most wanted first, so a short budget loses the least: the default cnn9 run, the A/B variants,
    # the bare steps, then resnet18, the MLP and the tests.
    print("full run of cnn9 (default config):", flush=True)
    runs.append(full_run("cnn9", images, labels, flipped, dataclasses.replace(default, model="cnn9"), device))

    print("A/B on short cnn9 runs (1 pre-training + 2 cyclic epochs):", flush=True)
    # A CPU without bf16 units emulates it hundreds of times slower than fp32, so the smoke run
    # checks the "bf16" variants' code paths in fp32 (their setup column says so).
    bf16 = dataclasses.replace(short, model="cnn9", precision="fp32" if args.smoke else "bf16")
    variants = {  # name: (config, cudnn.benchmark)
        "cnn9 fp32": (dataclasses.replace(bf16, precision="fp32"), False),
        "cnn9 bf16": (bf16, False),
        "cnn9 bf16 cudnn.benchmark": (bf16, True),
        "cnn9 bf16 b256/128": (
            dataclasses.replace(bf16, pretrain_batch_size=256, cyclic_batch_size=128),
            False,
        ),
        "cnn9 bf16 b512/256": (
            dataclasses.replace(bf16, pretrain_batch_size=512, cyclic_batch_size=256),
            False,
        ),
        "cnn9 bf16 compiled": (dataclasses.replace(bf16, compile_model=True), False),
        "cnn9 bf16 CUDA graphs": (
            dataclasses.replace(bf16, compile_model=True, compile_mode="reduce-overhead"),
            False,
        ),
    }
    for name, (config, autotune) in variants.items():
        reserve = 90.0 if config.compile_model else 45.0  # compilation takes its own tens of seconds
        run_if_time(
            name,
            reserve,
            functools.partial(
                full_run, name, images, labels, flipped, config, device, cudnn_benchmark=autotune
            ),
        )

    print("bare cnn9 training steps, eager vs one CUDA graph per step:", flush=True)
    graph_rows = []
    for batch in (16, 32, 64) if args.smoke else (64, 128, 256):
        if time_left() < 30:
            print(f"  batch {batch}: skipped, {time_left():.0f} s of the budget left", flush=True)
            graph_rows.append([batch, NAN, NAN, NAN])
            continue
        try:
            eager, graphed = step_rates(batch, device, steps=2 if args.smoke else 200, bf16=not args.smoke)
        except Exception as error:  # capture can fail on some versions; the rest still runs
            traceback.print_exc()
            print(f"  batch {batch}: FAILED ({type(error).__name__}: {error})", flush=True)
            eager, graphed = NAN, NAN
        graph_rows.append([batch, eager * batch, graphed * batch, graphed / eager])
        print(
            f"  batch {batch}: eager {eager * batch:.0f} samples/s, graphed {graphed * batch:.0f}", flush=True
        )

    print("full runs of resnet18 and the MLP (default config):", flush=True)
    resnet18_config = dataclasses.replace(default, model="resnet18")
    run_if_time(
        "resnet18",
        1.5 * runs[0].seconds,  # it costs about as much per sample as cnn9
        lambda: full_run("resnet18", images, labels, flipped, resnet18_config, device),
    )
    mlp_name = f"mlp {num_vectors:,}x512"

    def mlp_run() -> Run:
        vectors, clean_vectors = synthetic_features(
            num_vectors, 512, NUM_CLASSES, seed=SEED
        )  # (N, 512) float32
        vector_labels, vector_flipped = inject_noise(clean_vectors, NOISE, NUM_CLASSES, seed=SEED)
        return full_run(mlp_name, vectors, vector_labels, vector_flipped, default, device)

    run_if_time(mlp_name, 60.0, mlp_run)

    remaining = time_left()
    tests = run_gpu_tests(timeout=remaining - 15) if remaining > 75 else "skipped(budget)"

    header = ["run", "setup", "wall s", "samples/s", "cyclic samples/s", "peak GiB", "AUROC"]
    rows = [
        [
            r.name,
            r.setup,
            r.seconds,
            r.samples_per_second,
            r.cyclic_samples_per_second,
            r.peak_memory_gib,
            r.auroc,
        ]
        for r in runs
    ]
    print(format_table(header, rows))
    print(format_table(["batch", "eager samples/s", "graphed samples/s", "graphed/eager"], graph_rows))
    by_name = {r.name: r for r in runs}
    cnn9, resnet18, mlp = by_name["cnn9"], by_name["resnet18"], by_name[mlp_name]
    base = by_name["cnn9 bf16"]

    def speedup(name: str) -> str:  # cyclic-stage samples/s of a variant over plain bf16
        return f"{by_name[name].cyclic_samples_per_second / base.cyclic_samples_per_second:.2f}"

    peak = max([r.peak_memory_gib for r in runs if not np.isnan(r.peak_memory_gib)], default=NAN)
    print(
        f"summary: cnn9_samples_per_s={cnn9.samples_per_second:.0f} cnn9_s={cnn9.seconds:.1f} "
        f"cnn9_cyclic_samples_per_s={cnn9.cyclic_samples_per_second:.0f} "
        f"resnet18_samples_per_s={resnet18.samples_per_second:.0f} resnet18_s={resnet18.seconds:.1f} "
        f"mlp_1m_s={mlp.seconds:.1f} peak_memory_gib={peak:.2f} "
        f"fp32_vs_bf16={speedup('cnn9 fp32')} cudnn_benchmark_speedup={speedup('cnn9 bf16 cudnn.benchmark')} "
        f"b256_speedup={speedup('cnn9 bf16 b256/128')} b512_speedup={speedup('cnn9 bf16 b512/256')} "
        f"compile_speedup={speedup('cnn9 bf16 compiled')} "
        f"cuda_graphs_speedup={speedup('cnn9 bf16 CUDA graphs')} "
        f"graph_speedup_b{graph_rows[0][0]}={graph_rows[0][3]:.2f} "
        f"graph_samples_per_s_b{graph_rows[1][0]}={graph_rows[1][2]:.0f} "
        f"gpu_tests={tests} total_s={time.perf_counter() - began:.0f}"
    )


if __name__ == "__main__":
    main()
