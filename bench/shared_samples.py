"""The server's memory while a job trains in other processes: its samples held once or twice.

Data-parallel workers and the training process (`O2U_TRAINING_ISOLATION=process`) read the samples
from shared memory. This runs one short job on N x D float32 feature vectors (a loader's private
NumPy array, as `load_dataset` returns it) through the server's `Engine` and a real training
process, each way in a fresh Python process, and reads the caller's /proc/self/status at the first
progress event: `RssAnon` (its private memory, where the loader's array lives) and `RssShmem` (the
shared memory it filled for the training process), `RssFile` (mapped files: torch's libraries), and
the peak of all three (`VmHWM`, reset after the data is made) at the end of the job.

- `once`: `Engine.score` as the server runs it, which moves the samples into shared memory and
  leaves the dataset holding views of them (`jobs.engine.share_samples`);
- `twice`: the loader's array handed to the training process as it is, which copies it into shared
  memory beside the private one (how the server ran before).

The scores must be the same both ways. Usage:
`python bench/shared_samples.py [--samples 200000] [--dim 512]`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from common import format_table, machine_description, synthetic_features

MIB = 1024**2
CONFIG = {"model": "mlp", "seed": 0, "pretrain_epochs": 1, "cycle_length_epochs": 1, "num_cycles": 2}
WAYS = ("once", "twice")


def _memory() -> dict[str, int]:
    """This process's RssAnon, RssShmem, RssFile and VmHWM in bytes."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("RssAnon", "RssShmem", "RssFile", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


def run_child(way: str, samples: int, dim: int) -> None:
    """In a fresh process: one job `way`, then one JSON line on stdout."""
    import tempfile

    from o2u_server.datasets import LoadedDataset
    from o2u_server.jobs.engine import Engine, TrainingProcesses

    features, labels = synthetic_features(samples, dim, 10, seed=0)
    dataset = LoadedDataset(
        features, labels, [str(i) for i in range(samples)], [str(k) for k in range(10)], 0, "file"
    )
    del features, labels  # the dataset holds the loader's arrays, as in the server
    processes = TrainingProcesses(threads=1)
    processes.start(["cpu"])
    engine = (
        Engine(score_noise=processes.score_noise, processes=processes)
        if way == "once"
        else Engine(score_noise=processes.score_noise)  # the same training process, handed the array
    )
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here on: the job's peak, not the generator's
    before = _memory()
    during: list[dict[str, int]] = []
    with tempfile.TemporaryDirectory() as folder:
        report = engine.score(
            dataset,
            engine.resolve(CONFIG, dataset, "cpu"),
            device="cpu",
            progress=lambda _: during.append(_memory()) if not during else None,
            should_cancel=lambda: False,
            checkpoint_path=Path(folder) / "job.pt",
            checkpoint_interval_seconds=3600.0,
            initial_weights=None,
        )
    processes.close()
    during[0]["VmHWM"] = _memory()["VmHWM"]
    print(
        json.dumps(
            {"way": way, "before": before, "during": during[0], "scores": report.noise_scores[:1000].tolist()}
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--child", choices=WAYS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child, args.samples, args.dim)
        return
    print(machine_description())
    size = args.samples * args.dim * 4
    print(f"{args.samples:,} x {args.dim} float32 features: {size / MIB:.0f} MiB")
    results: dict[str, dict[str, Any]] = {}
    for way in WAYS:
        command = [
            sys.executable,
            __file__,
            "--child",
            way,
            "--samples",
            str(args.samples),
            "--dim",
            str(args.dim),
        ]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[way] = json.loads(output.strip().splitlines()[-1])
    rows = []
    for way in WAYS:
        before, during = results[way]["before"], results[way]["during"]
        rows.append(
            [
                way,
                f"{before['RssAnon'] / MIB:.0f}",
                f"{during['RssAnon'] / MIB:.0f}",
                f"{during['RssShmem'] / MIB:.0f}",
                f"{(during['RssAnon'] + during['RssShmem']) / MIB:.0f}",
                f"{during['RssFile'] / MIB:.0f}",
                f"{during['VmHWM'] / MIB:.0f}",
            ]
        )
    header = [
        "samples held",
        "private before MiB",
        "private training MiB",
        "shared MiB",
        "private + shared MiB",
        "files MiB",
        "job peak MiB",
    ]
    print(format_table(header, rows))
    same = results["once"]["scores"] == results["twice"]["scores"]
    saved = sum(results["twice"]["during"][k] - results["once"]["during"][k] for k in ("RssAnon", "RssShmem"))
    print(f"summary: dataset_mib={size / MIB:.0f} saved_mib={saved / MIB:.0f} same_scores={same}")
    if not same:
        raise SystemExit("the two ways gave different scores")


if __name__ == "__main__":
    main()
