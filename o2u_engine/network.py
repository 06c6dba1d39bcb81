"""What a phase trains: the model, the callable that runs it, and its SGD optimizer.

Every phase builds one `Network`: a fresh or continued model, wrapped for speed when configured
(`torch.compile`), and an optimizer with the reference O2U-Net settings (SGD with momentum and
weight decay), new or resumed from a checkpoint. Stage 3 measures a network's accuracy on the
held-out samples it trusts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from o2u_engine.config import ResolvedConfig
from o2u_engine.data import PreparedData


@dataclass(frozen=True)
class Network:
    """A model, the callable that runs it (the model itself or its compiled form), its optimizer."""

    model: nn.Module
    forward: Callable[[torch.Tensor], torch.Tensor]
    optimizer: torch.optim.SGD


def build_network(
    model: nn.Module,
    config: ResolvedConfig,
    *,
    learning_rate: float,
    optimizer_state: dict[str, Any] | None,
    device: torch.device,
) -> Network:
    """`model` with a new optimizer at `learning_rate`, or the resumed one from `optimizer_state`."""
    fused = {"fused": True} if device.type in ("cpu", "cuda") else {"foreach": True}
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=learning_rate,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        **fused,
    )
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    forward = torch.compile(model, mode=config.compile_mode) if config.compile_model else model
    return Network(model, forward, optimizer)


def accuracy(
    network: Network,
    data: PreparedData,
    labels: torch.Tensor,
    indices: np.ndarray,
    *,
    batch_size: int,
    bf16: bool,
) -> float:
    """Fraction of `indices` whose given label in `labels` (N,) the model predicts, without
    augmentation, in batches of `batch_size`."""
    network.model.eval()
    device = data.device
    device_indices = torch.as_tensor(indices, dtype=torch.int64).to(device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for batch in torch.split(device_indices, batch_size):
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = network.forward(data.normalize(data.load(batch)))  # (B, K)
        correct += (logits.argmax(dim=1) == labels[batch]).sum()
    return int(correct.item()) / max(1, len(indices))
