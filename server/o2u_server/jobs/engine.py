"""From a job's requested ScoringConfig fields to the engine's O2UConfig, and back to RunInfo.

The same function validates a request at CreateScoringJob (so a bad value is INVALID_ARGUMENT naming
the field before anything is queued) and builds the config the worker runs.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import torch

import o2u_engine
from o2u_engine import ConfigError, O2UConfig
from o2u_engine.config import validate_config
from o2u_server.domain import RunInfo
from o2u_server.errors import InvalidArgument

__all__ = ["engine_config", "resolved_run_info"]


def _field_named_in(message: str) -> str | None:
    names = [f.name for f in dataclasses.fields(O2UConfig) if f.name in message]
    return max(names, key=len) if names else None  # the longest match: "pretrain_epochs", not "epochs"


def engine_config(requested: Mapping[str, Any]) -> O2UConfig:
    """The O2UConfig for the requested fields; InvalidArgument naming `config.<field>` if invalid."""
    try:
        config = O2UConfig(**requested)
        validate_config(config)  # ranges only; `auto` fields are resolved once the data is loaded
        return config
    except (ConfigError, TypeError, ValueError) as exc:
        name = getattr(exc, "field", None) or _field_named_in(str(exc))
        raise InvalidArgument(
            f"invalid scoring config: {exc}",
            reason="INVALID_CONFIG",
            field=f"config.{name}" if name else "config",
        ) from exc


def _config_json(config: O2UConfig) -> str:
    return json.dumps(dataclasses.asdict(config), sort_keys=True, default=str)


def resolved_run_info(
    config: O2UConfig, device: str, num_samples: int, num_classes: int, server_version: str
) -> RunInfo:
    """What will run, recorded before training so a watcher sees it early; replaced by the report's
    own figures when the job succeeds."""
    return RunInfo(
        seed=int(config.seed),
        engine_version=o2u_engine.__version__,
        torch_version=torch.__version__,
        device=device,
        num_samples=num_samples,
        num_classes=num_classes,
        resolved_config_json=_config_json(config),
        server_version=server_version,
        model=str(config.model),
    )
