"""`make demo`: score real handwritten digits with known label noise, end to end, on this machine.

It writes scikit-learn's 1,797 8x8 digits with 20% of the labels flipped to another class (fixed
seed) into a demo data root, starts `o2u-server` as a subprocess with embedded defaults (SQLite
state, CPU or GPU), runs the same submit-watch-report path as `o2u score`, and then measures how
well the flipped labels were found: precision@k with k = the number of flipped labels, recall and
precision of the suspected set, and the estimated against the true noise rate. The server is
stopped with SIGTERM at the end; the exit status is non-zero if any step fails.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from o2u_client.client import Client
from o2u_client.errors import O2UError
from o2u_client.render import make_console
from o2u_client.scoring import score_dataset
from o2u_client.text import safe_text

__all__ = ["main", "write_noisy_digits"]

DATASET_FILE = "digits_noisy.npz"
TRUTH_FILE = "digits_flipped.json"
# Below this the demo counts as failed: random ranking would reach about the noise rate (0.2).
MIN_PRECISION_AT_K = 0.5


def write_noisy_digits(data_root: Path, *, noise_rate: float, seed: int) -> tuple[Path, np.ndarray]:
    """Write the digits with `noise_rate` of labels flipped to a different class; returns the
    dataset path and the sorted ids of the flipped samples."""
    from sklearn.datasets import load_digits  # shipped with scikit-learn, no download

    digits = load_digits()
    features = (digits.data / 16.0).astype(np.float32)  # (N, 64) pixel intensities in [0, 1]
    labels = digits.target.astype(np.int64)  # (N,)
    n, k = len(labels), int(labels.max()) + 1
    rng = np.random.default_rng(seed)
    flipped = np.sort(rng.choice(n, size=round(noise_rate * n), replace=False))
    noisy = labels.copy()
    # Symmetric noise: each flipped label moves to one of the K-1 other classes, uniformly.
    noisy[flipped] = (labels[flipped] + rng.integers(1, k, size=len(flipped))) % k
    ids = np.array([f"digit-{i:04d}" for i in range(n)])
    data_root.mkdir(parents=True, exist_ok=True)
    path = data_root / DATASET_FILE
    np.savez(path, x=features, y=noisy, ids=ids)
    truth = {"flipped_sample_ids": flipped.tolist(), "true_labels": labels.tolist(), "noise_rate": noise_rate}
    (data_root / TRUTH_FILE).write_text(json.dumps(truth))
    return path, flipped


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _log_tail(log_path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no server log)"


class DemoError(Exception):
    """A demo step failed; the message says which and why."""


@contextmanager
def running_server(data_root: Path, *, startup_timeout: float) -> Iterator[tuple[str, Path]]:
    """Start `o2u-server` on a free loopback port; yields (target, log path); SIGTERM on exit."""
    port = _free_port()
    target = f"127.0.0.1:{port}"
    log_path = data_root / "server.log"
    env = {
        **os.environ,
        "O2U_DATA_ROOTS": str(data_root.resolve()),
        "O2U_STATE_DIR": str((data_root / "state").resolve()),
        "O2U_LISTEN_ADDRESS": target,
        "O2U_METRICS_PORT": "0",
        "O2U_DEVICE": os.environ.get("O2U_DEVICE", "auto"),
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "o2u_server.main"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        started = time.monotonic()
        with Client(target, timeout=2.0, wait_for_ready=False) as probe:
            while not probe.healthy(timeout=1.0):
                if process.poll() is not None:
                    raise DemoError(
                        f"o2u-server exited with status {process.returncode} during startup; "
                        f"last lines of {log_path}:\n{_log_tail(log_path)}"
                    )
                if time.monotonic() - started > startup_timeout:
                    raise DemoError(
                        f"o2u-server did not report SERVING within {startup_timeout:.0f} s; "
                        f"last lines of {log_path}:\n{_log_tail(log_path)}"
                    )
                time.sleep(0.2)
        print(f"o2u-server is serving on {target} after {time.monotonic() - started:.1f} s (log: {log_path})")
        yield target, log_path
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        print(f"o2u-server stopped (exit status {process.returncode})")


def _report_quality(
    client: Client, job_id: str, flipped: np.ndarray, num_samples: int, estimated: float
) -> float:
    scores = list(client.scores(job_id, page_size=1000))
    by_rank = sorted(scores, key=lambda score: score.rank)
    k = len(flipped)
    flipped_set = set(flipped.tolist())
    hits_at_k = sum(score.sample_id in flipped_set for score in by_rank[:k])
    suspected = [score.sample_id for score in scores if score.suspected]
    suspected_hits = sum(sample_id in flipped_set for sample_id in suspected)
    precision_at_k = hits_at_k / k
    print(f"detection quality against the {k} labels the demo flipped:")
    print(
        f"  precision@{k}: {precision_at_k:.3f} ({hits_at_k} of the {k} highest-scored samples were flipped)"
    )
    if suspected:
        print(
            f"  suspected set: {len(suspected)} samples, recall {suspected_hits / k:.3f}, "
            f"precision {suspected_hits / len(suspected):.3f}"
        )
    print(f"  noise rate: estimated {estimated:.1%}, true {k / num_samples:.1%}")
    return precision_at_k


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m o2u_client.demo", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument(
        "--data-dir", type=Path, default=Path("demo-data"), help="demo data root (default ./demo-data)"
    )
    parser.add_argument(
        "--noise-rate", type=float, default=0.2, help="fraction of labels to flip (default 0.2)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top", type=int, default=10, help="suspects to print")
    parser.add_argument("--startup-timeout", type=float, default=120.0, help="seconds to wait for the server")
    args = parser.parse_args(argv)

    data_root: Path = args.data_dir.resolve()
    dataset, flipped = write_noisy_digits(data_root, noise_rate=args.noise_rate, seed=args.seed)
    print(
        f"wrote {dataset}: 1,797 scikit-learn digits (64 features each), "
        f"{len(flipped)} labels ({args.noise_rate:.0%}) flipped to another class"
    )
    try:
        with (
            running_server(data_root, startup_timeout=args.startup_timeout) as (target, _),
            Client(target) as client,
        ):
            outcome = score_dataset(
                client,
                dataset.as_uri(),
                console=make_console(),
                config={"seed": args.seed},
                display_name="demo: noisy digits",
                top=args.top,
            )
            if not outcome.succeeded or outcome.summary is None:
                raise DemoError(f"job {outcome.job.job_id} ended {outcome.job.state.value}")
            precision = _report_quality(
                client,
                outcome.job.job_id,
                flipped,
                outcome.summary.num_samples,
                outcome.summary.estimated_noise_rate,
            )
    except O2UError as error:
        print(f"error: {error.code.name}: {safe_text(error.message)}", file=sys.stderr)
        return 1
    except DemoError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if precision < MIN_PRECISION_AT_K:
        print(f"error: precision@k {precision:.3f} is below {MIN_PRECISION_AT_K}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
