"""Atomic training checkpoints that only hold tensors and plain containers.

A checkpoint is written at every epoch boundary to a temporary file in the same directory and
moved into place with `os.replace`, so a crash leaves either the previous checkpoint or the new
one, never half of one. It is read back with `torch.load(weights_only=True)`: the file holds
state dicts, generator states and numbers only, so loading it cannot run code. A fingerprint of
the resolved configuration and the labels guards against resuming a different run.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
from typing import Any

import numpy as np
import torch

from o2u_engine.config import ResolvedConfig
from o2u_engine.errors import ConfigError

CHECKPOINT_FORMAT = 1
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


def load_checkpoint(path: str | os.PathLike[str], fingerprint: str) -> dict[str, Any] | None:
    """The saved state, or None when there is no checkpoint yet; ConfigError for a foreign one."""
    source = os.fspath(path)
    if not os.path.exists(source):
        return None
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
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
