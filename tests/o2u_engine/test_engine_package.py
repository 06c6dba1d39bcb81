"""The public surface: the names other packages import, and the docstring example stays true."""

from __future__ import annotations

import doctest
import subprocess
import sys

import torch

import o2u_engine
from o2u_engine import available_cpu_count, configure_cpu_threads


def test_public_names() -> None:
    expected = {
        "__version__", "O2UConfig", "resolve_config", "score_noise", "ProgressEvent", "NoiseReport",
        "CleanRetrainingResult", "DataValidationError", "ConfigError", "Cancelled", "DeviceOutOfMemory",
    }  # fmt: skip
    assert expected <= set(o2u_engine.__all__)
    assert all(hasattr(o2u_engine, name) for name in o2u_engine.__all__)
    assert o2u_engine.__version__ == "0.1.0"
    assert issubclass(o2u_engine.DataValidationError, ValueError)
    assert issubclass(o2u_engine.ConfigError, ValueError)
    assert issubclass(o2u_engine.DeviceOutOfMemory, RuntimeError)


def test_the_package_docstring_example_runs() -> None:
    results = doctest.testmod(o2u_engine, raise_on_error=False, verbose=False)
    assert results.attempted >= 8
    assert results.failed == 0


def test_cpu_threads_follow_the_available_cores() -> None:
    previous = torch.get_num_threads()
    try:
        assert configure_cpu_threads(max_threads=1) == 1
        assert torch.get_num_threads() == 1
        assert 1 <= configure_cpu_threads() == available_cpu_count() == torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def test_importing_the_engine_leaves_torchvision_out() -> None:
    # torchvision's package import costs seconds (it pulls in torch._dynamo); every server start and
    # every spawned training process pays for it unless a ResNet is actually built.
    probe = "import sys, o2u_engine, o2u_engine.process; print('torchvision' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
