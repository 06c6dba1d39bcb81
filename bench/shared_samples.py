"""The server's memory while a job trains in other processes: its samples held once or twice.

Data-parallel workers and the training process (`O2U_TRAINING_ISOLATION=process`) read the samples
from shared memory. This writes N x D float32 feature vectors to a local .npz, then, each way in a
fresh Python process, loads it with `load_dataset` and runs one short job through the server's
`Engine` and a real training process. It reads the caller's /proc/self/status after loading and at
the first progress event: `RssAnon` (its private memory), `RssShmem` (shared memory), `RssFile`
(mapped files: torch's libraries), and the peak of all three (`VmHWM`, reset before loading) at the
end of the job.

- `decoded`: as the server runs it: the loader decodes into shared memory (`Engine.allocate`), and
  the training process reads that array;
- `moved`: the loader's private array, moved into shared memory before the job
  (`jobs.engine.share_samples`; how the server ran before `decoded`): both exist for the moment of
  the copy;
- `twice`: the loader's private array handed to the training process as it is, which copies it into
  shared memory beside the private one for the whole job (how the server ran before `moved`).

The scores must be the same every way. Usage:
`python bench/shared_samples.py [--samples 200000] [--dim 512]`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from common import format_table, machine_description, synthetic_features

MIB = 1024**2
CONFIG = {"model": "mlp", "seed": 0, "pretrain_epochs": 1, "cycle_length_epochs": 1, "num_cycles": 2}
WAYS = ("decoded", "moved", "twice")


def _memory() -> dict[str, int]:
    """This process's RssAnon, RssShmem, RssFile and VmHWM in bytes."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("RssAnon", "RssShmem", "RssFile", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


def run_child(way: str, path: Path) -> None:
    """In a fresh process: load `path` and run one job `way`, then one JSON line on stdout."""
    import tempfile

    import numpy as np

    from o2u_server.datasets import DatasetLimits, load_dataset
    from o2u_server.jobs.engine import Engine, TrainingProcesses
    from o2u_server.settings import Settings
    from o2u_server.storage import Storage

    processes = TrainingProcesses(threads=1)
    processes.start(["cpu"])
    engine = (
        Engine(score_noise=processes.score_noise, processes=processes)
        if way != "twice"
        else Engine(score_noise=processes.score_noise)  # the same training process, handed the array
    )
    settings = Settings(data_roots=[path.parent])
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here on: the load's and the job's peak
    dataset = load_dataset(
        path.as_uri(),
        None,
        Storage(settings),
        DatasetLimits.from_settings(settings),
        allocate=engine.allocate if way == "decoded" else np.empty,
    )
    loaded = _memory()
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
    scores = report.noise_scores[:1000].tolist()
    print(json.dumps({"way": way, "loaded": loaded, "during": during[0], "scores": scores}))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--child", choices=WAYS, help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child, args.path)
        return
    print(machine_description())
    size = args.samples * args.dim * 4
    print(f"{args.samples:,} x {args.dim} float32 features in a local .npz: {size / MIB:.0f} MiB")
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "features.npz"
        features, labels = synthetic_features(args.samples, args.dim, 10, seed=0)
        np.savez(path, x=features, y=labels)
        del features, labels
        for way in WAYS:
            command = [sys.executable, __file__, "--child", way, "--path", str(path)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[way] = json.loads(output.strip().splitlines()[-1])
    rows = []
    for way in WAYS:
        loaded, during = results[way]["loaded"], results[way]["during"]
        rows.append(
            [
                way,
                f"{loaded['RssAnon'] / MIB:.0f}",
                f"{loaded['RssShmem'] / MIB:.0f}",
                f"{during['RssAnon'] / MIB:.0f}",
                f"{during['RssShmem'] / MIB:.0f}",
                f"{(during['RssAnon'] + during['RssShmem']) / MIB:.0f}",
                f"{during['RssFile'] / MIB:.0f}",
                f"{during['VmHWM'] / MIB:.0f}",
            ]
        )
    header = [
        "samples",
        "private loaded MiB",
        "shared loaded MiB",
        "private training MiB",
        "shared training MiB",
        "private + shared MiB",
        "files MiB",
        "peak MiB",
    ]
    print(format_table(header, rows))
    same = all(results[way]["scores"] == results["decoded"]["scores"] for way in WAYS)

    def held(way: str) -> int:
        return sum(results[way]["during"][k] for k in ("RssAnon", "RssShmem"))

    def peak(way: str) -> int:
        return int(results[way]["during"]["VmHWM"])

    print(
        f"summary: dataset_mib={size / MIB:.0f} "
        f"held_saved_mib={(held('twice') - held('decoded')) / MIB:.0f} "
        f"peak_saved_mib={(peak('moved') - peak('decoded')) / MIB:.0f} same_scores={same}"
    )
    if not same:
        raise SystemExit("the ways gave different scores")


if __name__ == "__main__":
    main()
