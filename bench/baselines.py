"""The baselines O2U is measured against, trained exactly as O2U trains its own network.

A fair comparison changes only the scoring rule. So every baseline here trains the engine's own
model (`build_model` on the resolved config) on the engine's prepared data, with the engine's
phases: stage 1 at the fixed pre-training rate and batch, then the cyclic schedule with the
smaller batch - the same augmentation, optimizer, weight decay and epoch budget. From such runs:

- cleanlab: 5-fold cross-validated predicted probabilities (one full-budget training per fold,
  held-out fold predicted without augmentation), then `find_label_issues` (its suspected set,
  default `prune_by_noise_rate`) and `get_label_quality_scores` (its ranking, `self_confidence`).
- small loss: each sample's loss after stage 1 (the network in eval mode, no augmentation).
- AUM-style margin: assigned-class logit minus the largest other logit, averaged over every epoch
  of the full-budget run (taken from the training forward passes, as AUM does); low = suspicious.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import StratifiedKFold
from torch import nn

from o2u_engine import ResolvedConfig, build_model
from o2u_engine.augment import augment_batch, crop_padding
from o2u_engine.data import PreparedData, split_batches
from o2u_engine.layout import infer_layout
from o2u_engine.phases import Phase, plan_phases
from o2u_engine.scan import scan_samples


@dataclass(frozen=True)
class PlainRun:
    """What the single full-budget training run yields for the small-loss and margin baselines."""

    stage1_losses: np.ndarray  # (N,) cross-entropy after stage 1, eval mode
    stage1_seconds: float  # training through stage 1 plus the loss pass
    mean_margins: np.ndarray  # (N,) margin averaged over all epochs
    seconds: float  # the whole run


@dataclass(frozen=True)
class CleanlabResult:
    suspicion: np.ndarray  # (N,) 1 - label quality score; higher = more suspicious
    suspected: np.ndarray  # (N,) bool, find_label_issues
    pred_probs: np.ndarray  # (N, K) out-of-fold
    seconds: float  # K trainings + predictions + find_label_issues + quality scores


class BaselineTrainer:
    """Trains the engine's network with the engine's recipe on any subset of the samples."""

    def __init__(
        self,
        samples: np.ndarray,
        labels: np.ndarray,
        num_classes: int,
        config: ResolvedConfig,
        device: str = "cpu",
    ) -> None:
        started = time.perf_counter()
        self.config = config  # resolved, e.g. NoiseReport.config
        self.device = torch.device(device)
        self.num_classes = num_classes
        self.layout = infer_layout(tuple(samples.shape[1:]))
        self.data = PreparedData(
            samples,
            self.layout,
            scan_samples(samples, self.layout),
            image_size=config.image_size,
            device=self.device,
            placement="resident",
            chunk_samples=0,
        )
        self.labels = torch.as_tensor(labels, dtype=torch.int64, device=self.device)  # (N,)
        self.phases: list[Phase] = [
            p for p in plan_phases(config, len(labels)) if p.stage in ("pretraining", "cyclic")
        ]
        self.padding = crop_padding(config.image_size)
        self.bf16 = config.precision == "bf16"
        # Every method would prepare the data if run alone, so each one's time includes this.
        self.preparation_seconds = time.perf_counter() - started

    def _new_model(self) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            model = build_model(
                self.config.model,
                in_channels=self.layout.channels,
                num_classes=self.num_classes,
                image_size=self.config.image_size,
                feature_dim=None if self.layout.is_images else self.layout.feature_dim,
            )
        return model.to(self.device)

    def _logits(self, model: nn.Module, stored: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits: torch.Tensor = model(self.data.normalize(stored))  # (B, K)
        return logits.float()

    def train(
        self,
        indices: np.ndarray,
        *,
        margins: torch.Tensor | None = None,
        after_stage1: Callable[[nn.Module], None] | None = None,
    ) -> nn.Module:
        """Train a fresh network on `indices` through both phases.

        `margins` (N,) accumulates each trained sample's margin every epoch; `after_stage1` is
        called with the network when stage 1 ends.
        """
        model = self._new_model()
        generator = torch.Generator(device=self.device)
        generator.manual_seed(self.config.seed)
        subset = torch.as_tensor(indices, dtype=torch.int64, device=self.device)
        optimizer = torch.optim.SGD(
            model.parameters(),
            lr=self.phases[0].learning_rate(1),
            momentum=self.config.momentum,
            weight_decay=self.config.weight_decay,
            fused=self.device.type in ("cpu", "cuda"),  # as the engine's optimizer
        )
        for phase in self.phases:
            for epoch in range(1, phase.epochs + 1):
                for group in optimizer.param_groups:
                    group["lr"] = phase.learning_rate(epoch)
                model.train()
                order = subset[torch.randperm(subset.shape[0], generator=generator, device=self.device)]
                for batch in split_batches(order, phase.batch_size):
                    stored = self.data.load(batch)
                    stored = augment_batch(stored, self.config.augment, self.padding, generator)
                    logits = self._logits(model, stored)  # (B, K)
                    labels = self.labels[batch]
                    loss = F.cross_entropy(logits, labels)
                    optimizer.zero_grad(set_to_none=True)
                    torch.autograd.backward(loss)
                    optimizer.step()
                    if margins is not None:
                        margins[batch] += _margins(logits.detach(), labels).double()
            if phase.stage == "pretraining" and after_stage1 is not None:
                after_stage1(model)
        return model

    @torch.no_grad()
    def logits(self, model: nn.Module, indices: np.ndarray) -> torch.Tensor:
        """(n, K) float32 logits of `indices` in eval mode, without augmentation."""
        model.eval()
        subset = torch.as_tensor(indices, dtype=torch.int64, device=self.device)
        return torch.cat([self._logits(model, self.data.load(b)) for b in torch.split(subset, 1024)])

    def losses(self, model: nn.Module, indices: np.ndarray) -> np.ndarray:
        labels = self.labels[torch.as_tensor(indices, dtype=torch.int64, device=self.device)]
        return F.cross_entropy(self.logits(model, indices), labels, reduction="none").cpu().numpy()

    # -----------------------------------------------------------------------------------------------
    # The baselines

    def plain_run(self) -> PlainRun:
        """One full-budget training on all samples: small loss after stage 1, mean margin overall."""
        num_samples = self.labels.shape[0]
        everything = np.arange(num_samples)
        margins = torch.zeros(num_samples, dtype=torch.float64, device=self.device)
        stage1: list[tuple[np.ndarray, float]] = []
        start = time.perf_counter()

        def small_loss(model: nn.Module) -> None:
            seconds = self.preparation_seconds + time.perf_counter() - start
            stage1.append((self.losses(model, everything), seconds))

        self.train(everything, margins=margins, after_stage1=small_loss)
        seconds = self.preparation_seconds + time.perf_counter() - start
        epochs = sum(p.epochs for p in self.phases)
        return PlainRun(
            stage1_losses=stage1[0][0],
            stage1_seconds=stage1[0][1],
            mean_margins=(margins / epochs).cpu().numpy(),
            seconds=seconds,
        )

    def cross_validated_probabilities(self, folds: int = 5) -> np.ndarray:
        """(N, K) out-of-fold softmax probabilities, one full-budget training per fold."""
        labels = self.labels.cpu().numpy()
        pred_probs = np.zeros((len(labels), self.num_classes))
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=self.config.seed)
        for train_indices, held_out in splitter.split(np.zeros(len(labels)), labels):
            model = self.train(train_indices)
            pred_probs[held_out] = torch.softmax(self.logits(model, held_out), dim=1).double().cpu().numpy()
        return pred_probs

    def cleanlab(self, folds: int = 5) -> CleanlabResult:
        """cleanlab's pipeline: cross-validated probabilities, then its issue filter and quality scores."""
        from cleanlab.filter import find_label_issues
        from cleanlab.rank import get_label_quality_scores

        start = time.perf_counter()
        pred_probs = self.cross_validated_probabilities(folds)
        labels = self.labels.cpu().numpy()
        suspected = find_label_issues(labels, pred_probs)
        quality = get_label_quality_scores(labels, pred_probs)
        return CleanlabResult(
            suspicion=1.0 - quality,
            suspected=np.asarray(suspected, dtype=bool),
            pred_probs=pred_probs,
            seconds=self.preparation_seconds + time.perf_counter() - start,
        )


def _margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Assigned logit minus the largest other logit, (B,)."""
    assigned = logits.gather(1, labels[:, None])[:, 0]
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return assigned - others.max(dim=1).values
