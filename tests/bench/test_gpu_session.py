"""bench/gpu_session.sh as it runs on a GPU machine (no `--smoke`), with a stand-in for Python that
records the commands it is given: every step runs, in order, with its full-size arguments, and a
step that fails or prints nothing does not stop the ones after it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_session.sh"

# Prints a `summary:` line for the benchmarks that have one and fails the real-noise step, as a
# step on a broken machine would; every call is appended to $CALLS.
STAND_IN = """#!/usr/bin/env bash
echo "$O2U_TRAINING_ISOLATION $*" >>"$CALLS"
case $1 in
  real_noise.py) echo "Traceback: no CUDA" >&2; exit 3 ;;
  service_overhead.py) echo "summary: ratio=1.01" ;;
esac
"""


def run_session(tmp_path: Path, *steps: str) -> tuple[subprocess.CompletedProcess[str], Path, list[str]]:
    python = tmp_path / "python"
    python.write_text(STAND_IN)
    python.chmod(0o755)
    calls, out = tmp_path / "calls.txt", tmp_path / "out"
    env = {key: value for key, value in os.environ.items() if key != "CIFAR10N"}  # no --data argument
    env |= {"PYTHON": str(python), "CALLS": str(calls), "O2U_TRAINING_ISOLATION": "-"}
    result = subprocess.run(
        ["bash", str(SCRIPT), str(out), *steps], env=env, capture_output=True, text=True, timeout=60
    )
    return result, out, calls.read_text().splitlines() if calls.exists() else []


def test_every_step_runs_at_full_size_and_a_failed_step_does_not_stop_the_next(tmp_path: Path) -> None:
    result, out, calls = run_session(tmp_path, "gpu", "real_noise", "overhead", "overhead_process")

    assert result.returncode == 0, result.stderr
    assert calls == [
        "- gpu.py --budget 270",
        "- real_noise.py --quick --device cuda",
        "- service_overhead.py --device cuda --images 20000 --repeats 1",
        "process service_overhead.py --device cuda --images 20000 --repeats 1",
    ]
    summary = (out / "summary.txt").read_text()
    assert "exit 3 after" in summary  # the failed step, recorded
    assert summary.count("summary: ratio=1.01") == 2
    assert "Traceback: no CUDA" in (out / "real_noise.log").read_text()


def test_the_default_steps_are_the_three_that_fit_ten_minutes(tmp_path: Path) -> None:
    result, _, calls = run_session(tmp_path)

    assert result.returncode == 0, result.stderr
    assert [call.split()[1] for call in calls] == ["gpu.py", "service_overhead.py", "real_noise.py"]


def test_a_misspelt_step_stops_the_session_before_any_step_runs(tmp_path: Path) -> None:
    result, out, calls = run_session(tmp_path, "gpu", "overhed")

    assert result.returncode == 2
    assert "unknown step: overhed" in result.stderr
    assert calls == []
    assert not (out / "summary.txt").exists()
