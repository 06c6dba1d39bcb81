"""Atomic training checkpoints that only hold tensors and plain containers.

A checkpoint is the state of a run at an epoch boundary (`boundary_state`: the run's bookkeeping,
generator, model, optimizer and statistics). It is written to a temporary file in the same
directory, fsynced, and moved into place with `os.replace` (the directory fsynced after it, so the
rename outlives a power loss), so a crash leaves either the previous checkpoint or the new one,
never half of one, and read back with `torch.load(weights_only=True)`:
the file holds state dicts, generator states and numbers only, so loading it cannot run code. A
fingerprint of the resolved configuration and the labels guards against resuming a different run,
and a file that does not load (truncated, or damaged on its storage) is a ConfigError, which the
caller answers by starting over.
A checkpoint that cannot be written (a full disk) is logged and skipped: training goes on, and a
crash would resume from the last checkpoint that was written.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from o2u_engine.config import ResolvedConfig
from o2u_engine.errors import ConfigError
from o2u_engine.statistics import CyclicStatistics

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2  # bump when the stored state changes: older checkpoints are then refused
# Knobs that change where data lives, not what is computed; a retry may pick another placement.
_PLACEMENT_FIELDS = ("data_placement", "stream_chunk_samples")


def run_fingerprint(
    config: ResolvedConfig,
    labels: np.ndarray,
    sample_shape: tuple[int, ...],
    num_classes: int,
    engine_version: str,
) -> str:
    """A digest of everything that determines the scores apart from the sample values."""
    settings = {key: value for key, value in config.to_dict().items() if key not in _PLACEMENT_FIELDS}
    digest = hashlib.sha256()
    digest.update(repr(sorted(settings.items())).encode())
    digest.update(repr((tuple(sample_shape), num_classes, engine_version, CHECKPOINT_FORMAT)).encode())
    digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return digest.hexdigest()


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write `state` atomically: temporary file, fsync, then os.replace over `path`."""
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=os.path.basename(target) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(state, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, target)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    _sync_directory(directory)


def _sync_directory(directory: str) -> None:
    """fsync a directory, so a rename in it is on disk (where directories can be opened: POSIX)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some filesystems refuse to fsync a directory; the rename is still atomic
    finally:
        os.close(descriptor)


def load_checkpoint(path: str | os.PathLike[str], fingerprint: str) -> dict[str, Any] | None:
    """The saved state, or None when there is no checkpoint yet; ConfigError for a foreign one."""
    source = os.fspath(path)
    if not os.path.exists(source):
        return None
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as error:  # a damaged file fails in many ways: a bad pickle, zip entry, or text
        raise ConfigError(
            f"checkpoint_path: {source} is not a readable o2u checkpoint ({type(error).__name__}); "
            "delete it to start over",
            field="checkpoint_path",
        ) from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(
            f"checkpoint_path: {source} is not an o2u checkpoint of format {CHECKPOINT_FORMAT}; "
            "delete it to start over",
            field="checkpoint_path",
        )
    if state.get("fingerprint") != fingerprint:
        raise ConfigError(
            f"checkpoint_path: {source} was written by a different run (configuration, labels or "
            "engine version differ); delete it to start over",
            field="checkpoint_path",
        )
    return state


@dataclass
class RunState:
    """A run's bookkeeping at an epoch boundary: the checkpoint's fields besides the tensors."""

    phase_index: int = 0  # first phase not finished
    epochs_done: int = 0  # epochs finished in that phase
    batch_divisor: int = 1  # 2 ** (out-of-memory halvings so far)
    accuracies: list[float] = field(default_factory=list)  # stage 3: without removal, with removal
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage


def boundary_state(
    *,
    run: RunState,
    generator: torch.Generator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    statistics: CyclicStatistics,
) -> dict[str, Any]:
    """A copy (tensors cloned) of everything a resumed run needs, as a checkpoint holds it."""
    return copy.deepcopy(
        {
            "phase_index": run.phase_index,
            "epochs_done": run.epochs_done,
            "batch_divisor": run.batch_divisor,
            "accuracies": list(run.accuracies),
            "timings": dict(run.timings),
            "generator": generator.get_state(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "statistics": statistics.state_dict(),
        }
    )


def run_state(state: dict[str, Any]) -> RunState:
    """The bookkeeping of a loaded checkpoint."""
    return RunState(
        phase_index=state["phase_index"],
        epochs_done=state["epochs_done"],
        batch_divisor=state["batch_divisor"],
        accuracies=list(state["accuracies"]),
        timings=dict(state["timings"]),
    )


class Checkpoints:
    """The checkpoint file of one run: resumed from, and rewritten at its epoch boundaries.

    Writing costs ~10 ms (fsync and rename), too much after every short epoch: a state given to
    `keep` is written at once when forced (a phase's end) or when `interval_seconds` have passed
    since the last write, else kept in memory until the next one replaces it or `flush` writes it
    (when a stop interrupts the next epoch).
    """

    def __init__(self, path: str, fingerprint: str, interval_seconds: float = 0.0) -> None:
        self.path, self.fingerprint, self.interval_seconds = path, fingerprint, interval_seconds
        self._last_write = time.monotonic()
        self._kept: dict[str, Any] | None = None
        self.failed_writes = 0  # checkpoints that could not be written (e.g. no space left)

    def load(self) -> dict[str, Any] | None:
        """The last state written, None when there is none yet; see `load_checkpoint`."""
        return load_checkpoint(self.path, self.fingerprint)

    def keep(self, state: dict[str, Any], *, force: bool) -> None:
        self._kept = {"format": CHECKPOINT_FORMAT, "fingerprint": self.fingerprint, **state}
        if force or time.monotonic() - self._last_write >= self.interval_seconds:
            self.flush()

    def flush(self) -> None:
        if self._kept is not None:
            self._last_write = time.monotonic()
            try:
                save_checkpoint(self.path, self._kept)
            except (OSError, RuntimeError) as error:  # torch.save reports a failed write as RuntimeError
                self.failed_writes += 1
                logger.warning(
                    "could not write the checkpoint %s; training goes on without it: %s", self.path, error
                )
            self._kept = None
