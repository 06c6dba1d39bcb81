"""The O2U-Net trainer: one loop over the stages, readable top to bottom.

Stage 1 trains on the noisy labels at a fixed learning rate; stage 2 continues from those
weights with the cyclic learning rate and a smaller batch, recording every sample's loss each
epoch; optional stage 3 trains two fresh networks on the training split (with and without the
suspected samples) and measures both on the held-out split. Stages 1-2 train on all N samples
because every sample needs a score; only stage 3 holds data out.

The data lives on the device (or is streamed through it in chunks, with identical batches); each
epoch draws a permutation from the run's own `torch.Generator`, and per-sample losses are
written into a device tensor without a host sync per batch: the host reads one number per epoch.
The state at every epoch boundary (weights, optimizer, generator, statistics) is kept in memory
and checkpointed at most every `checkpoint_interval_seconds`, at every stage's end, and when a stop
interrupts an epoch; a resumed run continues bit-identically on the CPU. When the device runs out
of memory, the failing batch and the rest of the epoch are re-split at half the batch size, which
then holds for the rest of the run (at most three halvings); no finished step is repeated, so no
snapshot of the weights is needed.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from o2u_engine import checkpoint
from o2u_engine.augment import crop_padding, random_crop_flip
from o2u_engine.config import ResolvedConfig
from o2u_engine.data import Batch, PreparedData, validation_split
from o2u_engine.errors import Cancelled, DeviceOutOfMemory, TrainingDiverged
from o2u_engine.models import initialized_model
from o2u_engine.phases import Phase, plan_phases, progress_event, stage_epoch
from o2u_engine.rank import noise_scores, suspected_set
from o2u_engine.report import CleanRetrainingResult, ProgressEvent
from o2u_engine.statistics import CyclicStatistics

MAX_OOM_HALVINGS = 3  # batch size may be halved this many times per run before giving up
FaultHook = Callable[[str, int], None]  # (stage, batch size) -> None; tests raise OOM from it


@dataclass
class TrainingOutcome:
    statistics: CyclicStatistics
    clean_retraining: CleanRetrainingResult | None
    timings: dict[str, float]  # seconds per stage


class Trainer:
    """Runs the phases of one O2U-Net job over prepared data; `run()` returns the statistics."""

    def __init__(
        self,
        data: PreparedData,
        labels: np.ndarray,
        num_classes: int,
        config: ResolvedConfig,
        *,
        progress: Callable[[ProgressEvent], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        checkpoint_path: str | None = None,
        checkpoint_interval_seconds: float = 0.0,
        fingerprint: str = "",
        initial_state: dict[str, torch.Tensor] | None = None,
        fault_hook: FaultHook | None = None,
    ) -> None:
        self.data, self.config, self.num_classes = data, config, num_classes
        self.device = data.device
        self.labels = torch.as_tensor(labels, dtype=torch.int64).to(self.device)  # (N,)
        self.progress, self.should_cancel, self.fault_hook = progress, should_cancel, fault_hook
        self.checkpoint_path, self.fingerprint = checkpoint_path, fingerprint
        self.checkpoint_interval_seconds = checkpoint_interval_seconds
        self._last_save = time.monotonic()
        self._unsaved: dict[str, Any] | None = None  # the last epoch boundary, when not yet written
        self.initial_state = initial_state
        self.bf16 = config.precision == "bf16"
        self.cuda_graphs = config.compile_model and config.compile_mode == "reduce-overhead"
        self.padding = crop_padding(config.image_size)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(config.seed)
        self.statistics = CyclicStatistics(
            self.labels, num_classes, class_aware=config.class_aware_normalization
        )
        self.phases = plan_phases(config)
        split = validation_split(labels.shape[0], config.validation_fraction, config.seed)
        self.train_split, self.held_out = split.train, split.held_out
        num_samples, train_samples = labels.shape[0], self.train_split.shape[0]
        self.phase_samples = [
            num_samples if p.stage != "clean_retraining" else train_samples for p in self.phases
        ]
        self.phase_index = 0  # first phase not finished
        self.epochs_done = 0  # epochs finished in that phase
        self.batch_divisor = 1  # 2 ** (out-of-memory halvings so far)
        self.accuracies: list[float] = []  # stage 3: without removal, with removal
        self.removed = 0
        self.timings: dict[str, float] = {}
        self.model: nn.Module | None = None
        self.forward: Callable[[torch.Tensor], torch.Tensor] = lambda inputs: inputs
        self.optimizer: torch.optim.SGD | None = None
        self._suspects_after_stage2: np.ndarray | None = None

    # ---------------------------------------------------------------------------------------------
    # Which samples each phase trains on (stage 3 needs the suspects of stage 2)

    def _phase_indices(self, phase: Phase) -> torch.Tensor:
        """Samples a phase trains on, (n,) int64 on the device."""
        if phase.stage != "clean_retraining":
            return torch.arange(self.labels.shape[0], device=self.device)
        train = self.train_split
        if phase.removes_suspects:
            suspects = self._suspects()
            train = train[~suspects[train]]
            self.removed = int(self.train_split.shape[0] - train.shape[0])
        return torch.as_tensor(train, dtype=torch.int64).to(self.device)

    def _suspects(self) -> np.ndarray:
        """The suspected set after stage 2, exactly as the final report will compute it."""
        if self._suspects_after_stage2 is None:
            scores = noise_scores(self.statistics.mean.cpu().numpy())
            self._suspects_after_stage2 = suspected_set(scores, self.config.noise_rate).suspected
        return self._suspects_after_stage2

    # ---------------------------------------------------------------------------------------------
    # Model and optimizer

    def _new_model(self) -> nn.Module:
        return initialized_model(
            self.config.model,
            layout=self.data.layout,
            num_classes=self.num_classes,
            image_size=self.config.image_size,
            seed=self.config.seed,
            initial_state=self.initial_state,
            device=self.device,
        )

    def _start_phase(self, phase: Phase, resumed_optimizer: dict[str, Any] | None) -> None:
        if self.model is None or (phase.fresh_model and resumed_optimizer is None):
            self.model = self._new_model()
        self.forward = (
            torch.compile(self.model, mode=self.config.compile_mode)
            if self.config.compile_model
            else self.model
        )
        fused = {"fused": True} if self.device.type in ("cpu", "cuda") else {"foreach": True}
        self.optimizer = torch.optim.SGD(
            self.model.parameters(),
            lr=phase.learning_rate(1),
            momentum=self.config.momentum,
            weight_decay=self.config.weight_decay,
            **fused,
        )
        if resumed_optimizer is not None:
            self.optimizer.load_state_dict(resumed_optimizer)

    def _batch_size(self, phase: Phase) -> int:
        return max(2, phase.batch_size // self.batch_divisor)

    def _halve_batch_size(self, phase: Phase) -> None:
        if self.batch_divisor >= 2**MAX_OOM_HALVINGS or self._batch_size(phase) <= 2:
            raise DeviceOutOfMemory(
                f"device {self.device} ran out of memory in stage {phase.stage} at batch size "
                f"{self._batch_size(phase)} after halving it {self.batch_divisor.bit_length() - 1} times; "
                "use a smaller model, image_size or batch size"
            )
        self.batch_divisor *= 2
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---------------------------------------------------------------------------------------------
    # One optimizer step and one epoch

    def _step(self, batch: Batch, phase: Phase, epoch_losses: torch.Tensor) -> torch.Tensor:
        assert self.optimizer is not None
        indices, stored = batch.indices, batch.stored
        if self.fault_hook is not None:
            self.fault_hook(phase.stage, indices.shape[0])
        if self.cuda_graphs:
            # Each step is a new iteration for CUDA-graph trees: the last step's outputs are done.
            torch.compiler.cudagraph_mark_step_begin()  # type: ignore[no-untyped-call]
        labels = self.labels[indices]  # (B,)
        if self.config.augment:
            stored = random_crop_flip(stored, self.padding, self.generator)  # (B, C, S, S) uint8
        inputs = self.data.normalize(stored)  # (B, C, S, S) or (B, D) float32
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.forward(inputs)  # (B, K)
        losses = F.cross_entropy(logits.float(), labels, reduction="none")  # (B,)
        self.optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(losses.mean())
        self.optimizer.step()
        losses = losses.detach()
        if phase.records_losses:
            epoch_losses[indices] = losses
            self.statistics.record_predictions(indices, logits.detach().argmax(dim=1))
        return losses.sum(dtype=torch.float64)

    def _train_epoch(
        self, phase: Phase, indices: torch.Tensor, epoch_losses: torch.Tensor, stage_epoch: int
    ) -> float:
        """One pass over `indices` in a fresh random order; returns the mean loss (one host sync).

        `stage_epoch` is the 1-based epoch within the stage, as progress events number it."""
        assert self.model is not None
        self.model.train()
        order = indices[
            torch.randperm(indices.shape[0], generator=self.generator, device=self.device)
        ]  # (n,)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        trained = 0  # samples of `order` stepped on
        while trained < order.shape[0]:
            for batch in self.data.batches(order[trained:], self._batch_size(phase)):
                if self.should_cancel is not None and self.should_cancel():
                    raise Cancelled(f"cancelled during {phase.stage} epoch {stage_epoch}")
                try:
                    loss_sum += self._step(batch, phase, epoch_losses)
                except torch.OutOfMemoryError:
                    self._halve_batch_size(phase)  # and retry from this batch on
                    break
                trained += batch.indices.shape[0]
        mean_loss = float(loss_sum.item()) / max(1, order.shape[0])
        if not np.isfinite(mean_loss):  # checked before the epoch reaches the statistics
            field = "cycle_max_learning_rate" if phase.stage == "cyclic" else "pretrain_learning_rate"
            raise TrainingDiverged(
                f"{field}: training loss became {mean_loss} in {phase.stage} epoch {stage_epoch}; "
                f"expected a finite loss, lower {field}",
                field=field,
            )
        return mean_loss

    def _accuracy(self, indices: np.ndarray) -> float:
        """Fraction of `indices` whose given label the current model predicts (no augmentation)."""
        assert self.model is not None
        self.model.eval()
        device_indices = torch.as_tensor(indices, dtype=torch.int64).to(self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        for batch in torch.split(device_indices, 2 * self._batch_size(self.phases[0])):
            with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                logits = self.forward(self.data.normalize(self.data.load(batch)))  # (B, K)
            correct += (logits.argmax(dim=1) == self.labels[batch]).sum()
        return int(correct.item()) / max(1, len(indices))

    # ---------------------------------------------------------------------------------------------
    # Checkpoints

    def _snapshot(self) -> dict[str, Any]:
        """A copy of the whole training state at this epoch boundary (tensors cloned)."""
        assert self.model is not None
        assert self.optimizer is not None
        return copy.deepcopy(
            {
                "format": checkpoint.CHECKPOINT_FORMAT,
                "fingerprint": self.fingerprint,
                "phase_index": self.phase_index,
                "epochs_done": self.epochs_done,
                "batch_divisor": self.batch_divisor,
                "accuracies": list(self.accuracies),
                "timings": dict(self.timings),
                "generator": self.generator.get_state(),
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "statistics": self.statistics.state_dict(),
            }
        )

    def _save(self, state: dict[str, Any]) -> None:
        assert self.checkpoint_path is not None
        self._last_save = time.monotonic()
        checkpoint.save_checkpoint(self.checkpoint_path, state)

    def _resume(self) -> dict[str, Any] | None:
        """Restore the last epoch boundary; returns the optimizer state to continue its phase with."""
        if self.checkpoint_path is None:
            return None
        state = checkpoint.load_checkpoint(self.checkpoint_path, self.fingerprint)
        if state is None:
            return None
        self.phase_index, self.epochs_done = state["phase_index"], state["epochs_done"]
        self.batch_divisor, self.accuracies = state["batch_divisor"], list(state["accuracies"])
        self.timings = dict(state["timings"])
        self.generator.set_state(state["generator"])
        self.statistics.load_state_dict(state["statistics"])
        self.model = self._new_model()
        self.model.load_state_dict(state["model"])
        return state["optimizer"] if self.epochs_done > 0 else None

    # ---------------------------------------------------------------------------------------------
    # The run

    def run(self) -> TrainingOutcome:
        try:
            return self._run()
        except Cancelled:
            if self._unsaved is not None:  # stopped mid-epoch: resume from the last boundary
                self._save(self._unsaved)
            raise

    def _run(self) -> TrainingOutcome:
        resumed_optimizer = self._resume()
        num_samples = self.labels.shape[0]
        for index, phase in enumerate(self.phases):
            if index < self.phase_index:
                continue
            self._start_phase(phase, resumed_optimizer)
            resumed_optimizer = None
            indices = self._phase_indices(phase)  # (n,)
            # (N,) losses of the current epoch; only stage 2 records them
            epoch_losses = torch.zeros(num_samples if phase.records_losses else 0, device=self.device)
            for epoch in range(self.epochs_done + 1, phase.epochs + 1):
                started = time.perf_counter()
                learning_rate = phase.learning_rate(epoch)
                assert self.optimizer is not None
                for group in self.optimizer.param_groups:
                    group["lr"] = learning_rate
                mean_loss = self._train_epoch(
                    phase, indices, epoch_losses, stage_epoch(self.phases, index, epoch)
                )
                if phase.records_losses:
                    self.statistics.add_epoch(epoch_losses)
                if epoch == phase.epochs and phase.stage == "clean_retraining":
                    self.accuracies.append(self._accuracy(self._evaluation_indices()))
                seconds = time.perf_counter() - started
                self.timings[phase.stage] = self.timings.get(phase.stage, 0.0) + seconds
                # The boundary after an epoch; a finished phase is recorded as the next one at 0.
                self.phase_index, self.epochs_done = (
                    (index + 1, 0) if epoch == phase.epochs else (index, epoch)
                )
                if self.checkpoint_path is not None:
                    # Writing costs ~10 ms (fsync + rename), too much after every short epoch: the
                    # boundary is kept in memory and written at most every interval, at a phase's
                    # end, and when a stop interrupts the next epoch.
                    self._unsaved = self._snapshot()
                    if epoch == phase.epochs or (
                        time.monotonic() - self._last_save >= self.checkpoint_interval_seconds
                    ):
                        self._save(self._unsaved)
                        self._unsaved = None
                if self.progress is not None:
                    self.progress(
                        progress_event(
                            self.phases,
                            self.phase_samples,
                            index,
                            epoch,
                            mean_loss=mean_loss,
                            learning_rate=learning_rate,
                            seconds=seconds,
                        )
                    )
        return TrainingOutcome(self.statistics, self._clean_result(), dict(self.timings))

    def _evaluation_indices(self) -> np.ndarray:
        trusted = self.held_out[~self._suspects()[self.held_out]]
        return trusted if trusted.shape[0] > 0 else self.held_out

    def _clean_result(self) -> CleanRetrainingResult | None:
        if not self.config.clean_retraining:
            return None
        self._phase_indices(self.phases[-1])  # recomputes `removed` after a resume
        return CleanRetrainingResult(
            accuracy_without_removal=self.accuracies[0],
            accuracy_with_removal=self.accuracies[1],
            removed=self.removed,
            validation_samples=int(self._evaluation_indices().shape[0]),
        )
