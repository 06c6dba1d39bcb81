"""Data-parallel training of one run over `world_size` workers with torch.distributed.

Every worker holds all of the resident data and the same seeded generator, so every worker draws
the same permutation and the same augmentation of each global batch; worker `r` of `W` runs the
forward and backward pass on its contiguous shard (`shard_bounds`) of that batch only. The rule:

- The global batch is the configured batch size, as with one worker, so the schedule, the number
  of optimizer steps per epoch and the ranking quality do not depend on the worker count.
- Each worker backpropagates the sum of its shard's losses divided by the global batch size, and
  the gradients are summed over the workers (one all-reduce of all gradients, as DDP does): the
  step is the gradient of the global batch's mean loss, at the configured learning rate.
- Per-sample losses and logits of the whole batch reach every worker (one all-reduce of a buffer
  each worker fills at its shard's rows), so `CyclicStatistics` records every sample exactly once
  per epoch on every worker and all workers rank identically.
- BatchNorm follows the global batch: the model's BatchNorm layers become
  `syncnorm.WorkerBatchNorm` (the global batch's mean and variance, on gloo and NCCL alike), so
  the running statistics too are the same on every worker.
- Cancellation and out-of-memory are agreed on: `should_cancel` is one all-reduce (max) per batch,
  and a batch that ran out of memory on any worker is retried at half the batch size by all (the
  worker that ran out completes the step's BatchNorm collectives with zeros, and every worker
  restores the running statistics from before the step).

Parameters stay identical on every worker (same start, same summed gradient), so a run is
deterministic for a given world size and seed. Worker 0 alone reports progress and writes
checkpoints; every worker resumes from the same file, whose fingerprint includes the world size.
Every collective has the process group's timeout, so a worker that dies stops the others; a
collective that fails raises `CollectiveFailed`, which the caller tells apart from a worker's own
fault (`launch.rebuilt_error`).
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from o2u_engine import checkpoint
from o2u_engine.augment import augment_batch
from o2u_engine.data import Batch
from o2u_engine.errors import DeviceOutOfMemory
from o2u_engine.network import Network
from o2u_engine.phases import Phase
from o2u_engine.syncnorm import WorkerBatchNorm, convert_batch_norm
from o2u_engine.train import Trainer


class CollectiveFailed(RuntimeError):
    """A collective between the workers failed: a peer died, hung past the timeout, or left the group."""


def shard_bounds(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows [start, stop) of a batch of `size` that worker `rank` trains on (near-equal shards)."""
    base, extra = divmod(size, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class _WorkerCheckpoints(checkpoint.Checkpoints):
    """The run's checkpoint as one worker sees it: every worker reads it, worker 0 writes it."""

    def __init__(self, source: checkpoint.Checkpoints, world_size: int, *, writes: bool) -> None:
        tagged = hashlib.sha256(f"{source.fingerprint}/world_size={world_size}".encode()).hexdigest()
        super().__init__(source.path, tagged, source.interval_seconds)
        self.writes = writes

    def keep(self, state: dict[str, Any], *, force: bool) -> None:
        if self.writes:
            super().keep(state, force=force)

    def flush(self) -> None:
        if self.writes:
            super().flush()


class DistributedTrainer(Trainer):
    """A Trainer that is one of `world_size` workers of a run (the process group is initialized)."""

    @staticmethod
    def workers() -> int:
        return dist.get_world_size()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.step_collectives = 0  # collectives of the current step's forward and backward pass
        local_cancel = self.should_cancel
        self.should_cancel = lambda: self._any(local_cancel is not None and local_cancel())
        if self.rank != 0:
            self.progress = None
        if self.checkpoints is not None:
            self.checkpoints = _WorkerCheckpoints(self.checkpoints, self.world_size, writes=self.rank == 0)

    def _any(self, flag: bool) -> bool:
        """Whether `flag` is true on any worker (one all-reduce)."""
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        self._all_reduce(value, dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def _all_reduce(self, tensor: torch.Tensor, op: Any = dist.ReduceOp.SUM) -> None:
        """All-reduce in place, counted in the run's timings: "communication" (seconds spent in
        collectives, waiting for the slowest worker included) and "communication_bytes"."""
        started = time.perf_counter()
        self.step_collectives += 1
        try:
            dist.all_reduce(tensor, op=op)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as error:  # gloo and NCCL raise plain RuntimeErrors (DistBackendError)
            raise CollectiveFailed(
                f"worker {self.rank} of {self.world_size}: a collective between the training workers "
                f"failed ({error}); another worker died or stopped answering"
            ) from error
        timings = self.state.timings
        timings["communication"] = timings.get("communication", 0.0) + time.perf_counter() - started
        size = float(tensor.numel() * tensor.element_size())
        timings["communication_bytes"] = timings.get("communication_bytes", 0.0) + size

    def _new_model(self) -> nn.Module:
        return convert_batch_norm(super()._new_model(), self._all_reduce)

    def _step(self, network: Network, phase: Phase, batch: Batch) -> torch.Tensor:
        """One optimizer step on this worker's shard of the global `batch`; returns the sum of the
        whole batch's losses, on the device (the same on every worker)."""
        size = batch.indices.shape[0]
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # type: ignore[no-untyped-call]
        start, stop = shard_bounds(size, self.rank, self.world_size)
        network.optimizer.zero_grad(set_to_none=True)
        norms = [m for m in network.model.modules() if isinstance(m, WorkerBatchNorm)]
        generator = self.generator.get_state()
        running: list[dict[str, torch.Tensor]] = []
        outputs: torch.Tensor | None = None
        self.step_collectives = 0
        # Everything that allocates before the step's one agreement runs here, so that a worker out
        # of memory anywhere in it says so in that collective, as every other worker does.
        try:  # an empty shard runs too: the layers' collectives must match on every worker
            if self.fault_hook is not None:
                self.fault_hook(phase.stage, size)
            # the whole batch, so every worker's generator stays in step
            stored = augment_batch(batch.stored, self.config.augment, self.padding, self.generator)
            # [out of memory flag, losses (B,), logits (B, K)], each worker filling its own rows
            outputs = torch.zeros(1 + size * (1 + self.num_classes), dtype=torch.float32, device=self.device)
            running = [
                {k: v.clone() for k, v in m.state_dict().items() if k.startswith(("running", "num_batches"))}
                for m in norms
            ]
            self._shard_pass(network, batch.indices[start:stop], stored[start:stop], outputs, size)
        except torch.OutOfMemoryError:
            outputs = None
            self._finish_norm_collectives(norms)
        if outputs is None:  # freed by the failure, so there is room for the flag again
            outputs = torch.zeros(1 + size * (1 + self.num_classes), dtype=torch.float32, device=self.device)
            outputs[0] = 1.0
        self._all_reduce(outputs)
        if outputs[0].item() > 0:  # every worker retries the batch at half the size, from the same state
            network.optimizer.zero_grad(set_to_none=True)
            for module, state in zip(norms, running, strict=False):  # none, if it failed before the pass
                module.load_state_dict(state, strict=False)
            self.generator.set_state(generator)  # a worker may have failed partway through augmenting
            raise torch.OutOfMemoryError("a worker ran out of memory")
        try:
            self._all_reduce_gradients(network.model)
            network.optimizer.step()
            losses = outputs[1 : 1 + size]
            if phase.records_losses:
                self.statistics.record(
                    batch.indices, losses, outputs[1 + size :].view(size, self.num_classes)
                )
        except torch.OutOfMemoryError as error:
            # Past the agreement the workers can no longer retry the batch together: the run stops.
            raise DeviceOutOfMemory(
                f"device {self.device} ran out of memory on worker {self.rank} of {self.world_size} while "
                f"exchanging gradients or updating the model at batch size {size} ({error}); use a "
                "smaller model, image_size or batch size"
            ) from error
        return losses.sum(dtype=torch.float64)

    def _finish_norm_collectives(self, norms: list[WorkerBatchNorm]) -> None:
        """After an out-of-memory error inside the shard's pass, take part in the BatchNorm
        collectives the other workers still run in this step (each layer's statistics forward in
        module order, then its gradient sums backward in reverse order), with zeros."""
        sizes = [2 * m.num_features + 1 for m in norms] + [2 * m.num_features for m in reversed(norms)]
        for size in sizes[self.step_collectives :]:
            self._all_reduce(torch.zeros(size, dtype=torch.float64, device=self.device))

    def _shard_pass(
        self, network: Network, indices: torch.Tensor, stored: torch.Tensor, outputs: torch.Tensor, size: int
    ) -> None:
        """Forward and backward on one shard; its losses and logits go to their rows of `outputs`."""
        labels = self.labels[indices]  # (b,)
        inputs = self.data.normalize(stored)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = network.forward(inputs)  # (b, K)
        losses = F.cross_entropy(logits.float(), labels, reduction="none")  # (b,)
        torch.autograd.backward(losses.sum() / size)
        start, _ = shard_bounds(size, self.rank, self.world_size)
        stop = start + losses.shape[0]
        outputs[1 + start : 1 + stop] = losses.detach()
        rows = outputs[1 + size :].view(size, self.num_classes)
        rows[start:stop] = logits.detach().float()

    def _all_reduce_gradients(self, model: nn.Module) -> None:
        """Sum every parameter's gradient over the workers, in one flat all-reduce."""
        parameters = [p for p in model.parameters() if p.requires_grad]
        for parameter in parameters:
            if parameter.grad is None:  # an empty shard: this worker adds nothing
                parameter.grad = torch.zeros_like(parameter)
        grads = [p.grad for p in parameters if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self._all_reduce(flat)
        for grad, values in zip(grads, torch.split(flat, [g.numel() for g in grads]), strict=True):
            grad.copy_(values.view(grad.shape))
