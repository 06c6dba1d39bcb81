"""BatchNorm over the global batch of data-parallel workers, for any torch.distributed backend.

`torch.nn.SyncBatchNorm` runs on GPUs only; this layer does the same on gloo (CPU) and NCCL: in
training, every worker sums its shard's per-channel count, sum and sum of squares, one all-reduce
makes them the global batch's, and the shard is normalized by the global mean and (biased)
variance; the running statistics are updated with the unbiased global variance, identically on
every worker. The backward pass all-reduces the per-channel sums of the output gradient and of its
product with the normalized input, which is the exact gradient of the global batch (each worker
returns its own shard's weight and bias gradients; the trainer sums those over the workers like
every other gradient). Sums are taken in float64, so the result matches a single worker's
BatchNorm on the whole batch to rounding. In evaluation it is the plain BatchNorm layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

Reduce = Callable[[torch.Tensor], None]  # in-place sum over the workers


class _GlobalBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        layer: WorkerBatchNorm,
    ) -> torch.Tensor:
        dims = [0, *range(2, x.dim())]
        channels = x.shape[1]
        shape = [1, channels] + [1] * (x.dim() - 2)
        xf = x.float()
        count = torch.full((1,), float(xf.numel() // channels), dtype=torch.float64, device=x.device)
        stats = torch.cat(
            [xf.sum(dims, dtype=torch.float64), xf.square().sum(dims, dtype=torch.float64), count]
        )
        layer.reduce(stats)
        total = stats[-1].clamp(min=1.0)
        mean = stats[:channels] / total
        var = (stats[channels : 2 * channels] / total - mean.square()).clamp(min=0.0)
        invstd = torch.rsqrt(var + layer.eps)
        layer.update_running(mean, var * total / (total - 1).clamp(min=1.0))
        xhat = (xf - mean.float().view(shape)) * invstd.float().view(shape)
        ctx.save_for_backward(xhat, weight, invstd.float())
        ctx.total, ctx.layer, ctx.dims, ctx.shape = total, layer, dims, shape
        y = xhat * weight.view(shape) + bias.view(shape)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xhat, weight, invstd = ctx.saved_tensors
        dims, shape, channels = ctx.dims, ctx.shape, xhat.shape[1]
        dyf = dy.float()
        local = torch.cat([dyf.sum(dims, dtype=torch.float64), (dyf * xhat).sum(dims, dtype=torch.float64)])
        grad_bias, grad_weight = local[:channels].float(), local[channels:].float()
        sums = local.clone()
        ctx.layer.reduce(sums)
        mean_dy = (sums[:channels] / ctx.total).float().view(shape)
        mean_dy_xhat = (sums[channels:] / ctx.total).float().view(shape)
        dx = (dyf - mean_dy - xhat * mean_dy_xhat) * (weight * invstd).view(shape)
        return dx.to(dy.dtype), grad_weight.to(weight.dtype), grad_bias.to(weight.dtype), None


class WorkerBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm{1,2,3}d over the global batch; `reduce` sums a tensor over the workers."""

    def __init__(self, source: nn.modules.batchnorm._BatchNorm, reduce: Reduce) -> None:
        super().__init__(
            source.num_features, source.eps, source.momentum, source.affine, source.track_running_stats
        )
        self.load_state_dict(source.state_dict())
        self.reduce = reduce

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def update_running(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        if not self.track_running_stats or self.running_mean is None or self.running_var is None:
            return
        assert isinstance(self.num_batches_tracked, torch.Tensor)
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        with torch.no_grad():
            self.running_mean.mul_(1 - momentum).add_(mean.to(self.running_mean.dtype), alpha=momentum)
            self.running_var.mul_(1 - momentum).add_(unbiased_var.to(self.running_var.dtype), alpha=momentum)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or not self.affine:
            return super().forward(input)
        assert self.weight is not None
        assert self.bias is not None
        output: torch.Tensor = _GlobalBatchNorm.apply(input, self.weight, self.bias, self)
        return output


def convert_batch_norm(module: nn.Module, reduce: Reduce) -> nn.Module:
    """`module` with every BatchNorm layer replaced by a WorkerBatchNorm (same state dict keys)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return WorkerBatchNorm(module, reduce).to(next(iter(module.state_dict().values())).device)
    for name, child in module.named_children():
        module.add_module(name, convert_batch_norm(child, reduce))
    return module
