"""WorkerBatchNorm against torch's BatchNorm: on one worker (a gloo group of one) its outputs,
input gradients, parameter gradients and running statistics are those of nn.BatchNorm2d, and
an empty shard passes through (a worker whose shard of a small batch is empty)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from o2u_engine.syncnorm import WorkerBatchNorm, convert_batch_norm


@pytest.fixture
def group(tmp_path: Path) -> Iterator[None]:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_one_worker_is_plain_batch_norm(group: None) -> None:
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    worker = convert_batch_norm(copy.deepcopy(reference), dist.all_reduce)
    assert isinstance(worker[1], WorkerBatchNorm)
    assert worker.state_dict().keys() == reference.state_dict().keys()
    x = torch.randn(6, 3, 7, 7) * 3 + 1
    for model in (reference, worker):
        model.train()
        for _ in range(2):
            model.zero_grad()
            model(x).square().mean().backward()
    torch.testing.assert_close(worker(x), reference(x), rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(worker.named_parameters(), reference.parameters(), strict=True):
        assert a.grad is not None, name
        assert b.grad is not None, name
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    for (name, a), b in zip(worker.named_buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    worker.eval()
    reference.eval()
    torch.testing.assert_close(worker(x), reference(x), rtol=1e-5, atol=1e-5)


def test_an_empty_shard_passes(group: None) -> None:
    layer = convert_batch_norm(nn.BatchNorm2d(4), dist.all_reduce)
    empty = torch.zeros(0, 4, 5, 5, requires_grad=True)
    out = layer(empty)
    out.sum().backward()
    assert out.shape == empty.shape
