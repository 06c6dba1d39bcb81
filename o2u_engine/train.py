"""The O2U-Net trainer: one loop over the stages, readable top to bottom.

Stage 1 trains on the noisy labels at a fixed learning rate; stage 2 continues from those
weights with the cyclic learning rate and a smaller batch, recording every sample's loss each
epoch; optional stage 3 trains two fresh networks on the training split (with and without the
suspected samples) and measures both on the held-out split.

Four levels, a function each: the run (`_run`: the phases in order, from the last checkpoint), a
phase (`_train_phase`: its epochs, each ending at a boundary that the statistics, the checkpoint
and a progress event see), an epoch (`_train_epoch`: a fresh permutation from the run's own
`torch.Generator`, in the prepared data's batches) and a step (`_step`). Per-sample outputs stay
on the device, so the host reads one number per epoch, and a resumed run continues
bit-identically on the CPU. When the device runs out of memory, the failing batch and the rest of
the epoch are re-split at half the batch size, which then holds for the rest of the run (at most
three halvings); no finished step is repeated, so no snapshot of the weights is needed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from o2u_engine import checkpoint
from o2u_engine.augment import augment_batch, crop_padding
from o2u_engine.config import ResolvedConfig
from o2u_engine.data import Batch, PreparedData, validation_split
from o2u_engine.errors import Cancelled, DeviceOutOfMemory, TrainingDiverged
from o2u_engine.models import initialized_model
from o2u_engine.network import Network, accuracy, build_network
from o2u_engine.phases import (
    Phase,
    RetrainingSamples,
    phase_indices,
    plan_phases,
    progress_event,
    retraining_samples,
    stage_epoch,
)
from o2u_engine.rank import cyclic_suspects
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
    """Runs the phases of one O2U-Net job over prepared data; `run()` returns the statistics of
    stage 2 and the result of stage 3."""

    @staticmethod
    def workers() -> int:
        """How many workers train the run together, each with a trainer of this class."""
        return 1

    def __init__(
        self,
        data: PreparedData,
        labels: np.ndarray,
        num_classes: int,
        config: ResolvedConfig,
        *,
        progress: Callable[[ProgressEvent], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        checkpoints: checkpoint.Checkpoints | None = None,
        initial_state: dict[str, torch.Tensor] | None = None,
        fault_hook: FaultHook | None = None,
    ) -> None:
        self.data, self.config, self.num_classes = data, config, num_classes
        self.device = data.device
        self.num_samples = labels.shape[0]
        self.labels = torch.as_tensor(labels, dtype=torch.int64).to(self.device)  # (N,)
        self.progress, self.should_cancel, self.fault_hook = progress, should_cancel, fault_hook
        self.checkpoints = checkpoints
        self.initial_state = initial_state
        self.bf16 = config.precision == "bf16"
        self.cuda_graphs = config.compile_model and config.compile_mode == "reduce-overhead"
        self.padding = crop_padding(config.image_size)
        self.split = validation_split(self.num_samples, config.validation_fraction, config.seed)
        self.phases = plan_phases(config, self.num_samples)
        # The state at the last epoch boundary, as a checkpoint holds it with the model's and the
        # optimizer's: where the run is, its random generator, and what it has computed so far.
        self.state = checkpoint.RunState()
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(config.seed)
        self.statistics = CyclicStatistics(
            self.labels, num_classes, class_aware=config.class_aware_normalization
        )

    # ---------------------------------------------------------------------------------------------
    # The run, a phase

    def run(self) -> TrainingOutcome:
        try:
            return self._run()
        except Cancelled:
            if self.checkpoints is not None:  # stopped mid-epoch: resume from the last boundary
                self.checkpoints.flush()
            raise

    def _run(self) -> TrainingOutcome:
        model, optimizer_state = self._resume()
        retraining: RetrainingSamples | None = None  # stage 3's samples, known once stage 2 is over
        for index in range(self.state.phase_index, len(self.phases)):
            phase = self.phases[index]
            if phase.stage == "clean_retraining" and retraining is None:
                retraining = self._retraining_samples()
            if model is None or (phase.fresh_model and optimizer_state is None):
                model = self._new_model()
            network = build_network(
                model,
                self.config,
                learning_rate=phase.learning_rate(1),
                optimizer_state=optimizer_state,
                device=self.device,
            )
            optimizer_state = None  # a resumed optimizer continues its own phase only
            self._train_phase(network, index, retraining)
        if not self.config.clean_retraining:
            return TrainingOutcome(self.statistics, None, dict(self.state.timings))
        if retraining is None:  # resumed after stage 3's last epoch
            retraining = self._retraining_samples()
        clean = CleanRetrainingResult(
            accuracy_without_removal=self.state.accuracies[0],
            accuracy_with_removal=self.state.accuracies[1],
            removed=retraining.removed,
            validation_samples=int(retraining.evaluation.shape[0]),
        )
        return TrainingOutcome(self.statistics, clean, dict(self.state.timings))

    def _train_phase(self, network: Network, index: int, retraining: RetrainingSamples | None) -> None:
        """The remaining epochs of `self.phases[index]`, each followed by its boundary."""
        phase = self.phases[index]
        indices = torch.as_tensor(phase_indices(phase, self.num_samples, retraining)).to(self.device)  # (n,)
        for epoch in range(self.state.epochs_done + 1, phase.epochs + 1):
            started = time.perf_counter()
            learning_rate = phase.learning_rate(epoch)
            for group in network.optimizer.param_groups:
                group["lr"] = learning_rate
            mean_loss = self._train_epoch(network, phase, indices, stage_epoch(self.phases, index, epoch))
            if phase.records_losses:
                self.statistics.end_epoch()
            if epoch == phase.epochs and retraining is not None:  # a trained stage-3 model
                self.state.accuracies.append(self._accuracy(network, retraining.evaluation))
            seconds = time.perf_counter() - started
            self._reach_boundary(network, index, epoch, seconds)
            if self.progress is not None:
                self.progress(
                    progress_event(
                        self.phases,
                        index,
                        epoch,
                        mean_loss=mean_loss,
                        learning_rate=learning_rate,
                        seconds=seconds,
                    )
                )

    def _reach_boundary(self, network: Network, index: int, epoch: int, seconds: float) -> None:
        """Record a finished epoch in the run's state and keep that state for a checkpoint."""
        phase = self.phases[index]
        self.state.timings[phase.stage] = self.state.timings.get(phase.stage, 0.0) + seconds
        last = epoch == phase.epochs
        # A finished phase is recorded as the next one at epoch 0.
        self.state.phase_index, self.state.epochs_done = (index + 1, 0) if last else (index, epoch)
        if self.checkpoints is not None:
            state = checkpoint.boundary_state(
                run=self.state,
                generator=self.generator,
                model=network.model,
                optimizer=network.optimizer,
                statistics=self.statistics,
            )
            self.checkpoints.keep(state, force=last)

    # ---------------------------------------------------------------------------------------------
    # One epoch and one optimizer step

    def _train_epoch(self, network: Network, phase: Phase, indices: torch.Tensor, stage_epoch: int) -> float:
        """One pass over `indices` in a fresh random order; returns the mean loss (one host sync).

        `stage_epoch` is the 1-based epoch within the stage, as progress events number it."""
        network.model.train()
        permutation = torch.randperm(indices.shape[0], generator=self.generator, device=self.device)
        order = indices[permutation]  # (n,)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        trained = 0  # samples of `order` stepped on
        while trained < order.shape[0]:
            for batch in self.data.batches(order[trained:], self._batch_size(phase)):
                if self.should_cancel is not None and self.should_cancel():
                    raise Cancelled(f"cancelled during {phase.stage} epoch {stage_epoch}")
                try:
                    loss_sum += self._step(network, phase, batch)
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

    def _step(self, network: Network, phase: Phase, batch: Batch) -> torch.Tensor:
        """One optimizer step on `batch`; returns the sum of its losses, on the device."""
        if self.fault_hook is not None:
            self.fault_hook(phase.stage, batch.indices.shape[0])
        if self.cuda_graphs:
            # Each step is a new iteration for CUDA-graph trees: the last step's outputs are done.
            torch.compiler.cudagraph_mark_step_begin()  # type: ignore[no-untyped-call]
        labels = self.labels[batch.indices]  # (B,)
        stored = batch.stored
        stored = augment_batch(stored, self.config.augment, self.padding, self.generator)  # (B, C, S, S)
        inputs = self.data.normalize(stored)  # (B, C, S, S) or (B, D) float32
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = network.forward(inputs)  # (B, K)
        losses = F.cross_entropy(logits.float(), labels, reduction="none")  # (B,)
        network.optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(losses.mean())
        network.optimizer.step()
        losses = losses.detach()
        if phase.records_losses:
            self.statistics.record(batch.indices, losses, logits.detach())
        return losses.sum(dtype=torch.float64)

    def _batch_size(self, phase: Phase) -> int:
        return max(2, phase.batch_size // self.state.batch_divisor)

    def _halve_batch_size(self, phase: Phase) -> None:
        divisor = self.state.batch_divisor
        if divisor >= 2**MAX_OOM_HALVINGS or self._batch_size(phase) <= 2:
            raise DeviceOutOfMemory(
                f"device {self.device} ran out of memory in stage {phase.stage} at batch size "
                f"{self._batch_size(phase)} after halving it {divisor.bit_length() - 1} times; "
                "use a smaller model, image_size or batch size"
            )
        self.state.batch_divisor *= 2
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---------------------------------------------------------------------------------------------
    # The model; stage 3's accuracy and samples

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

    def _accuracy(self, network: Network, indices: np.ndarray) -> float:
        batch_size = 2 * self._batch_size(self.phases[0])
        return accuracy(network, self.data, self.labels, indices, batch_size=batch_size, bf16=self.bf16)

    def _retraining_samples(self) -> RetrainingSamples:
        """Stage 3's samples, for exactly the suspects the report will name (stage 2 is over)."""
        kind, images = self.config.score, self.data.layout.is_images
        suspects = cyclic_suspects(
            self.statistics.scores(kind).cpu().numpy(),
            self.statistics.prediction_counts.cpu().numpy(),
            self.labels.cpu().numpy(),
            score=kind,
            images=images,
            noise_rate=self.config.noise_rate,
            rate_scores=self.statistics.rate_scores(kind, images=images),
        )
        return retraining_samples(self.split, suspects.suspected)

    # ---------------------------------------------------------------------------------------------
    # Checkpoints

    def _resume(self) -> tuple[nn.Module | None, dict[str, Any] | None]:
        """Restore the last epoch boundary: the model trained so far, and the optimizer state when
        the boundary lies inside a phase; (None, None) without a checkpoint."""
        saved = None if self.checkpoints is None else self.checkpoints.load()
        if saved is None:
            return None, None
        self.state = checkpoint.run_state(saved)
        self.generator.set_state(saved["generator"])
        self.statistics.load_state_dict(saved["statistics"])
        model = self._new_model()
        model.load_state_dict(saved["model"])
        return model, saved["optimizer"] if self.state.epochs_done > 0 else None
