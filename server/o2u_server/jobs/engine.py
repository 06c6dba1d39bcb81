"""The one boundary between the server and the engine (`o2u_engine`): whatever crosses it is
translated here, so the rest of the server speaks only its own domain types.

- Requests: a job's requested ScoringConfig fields become the engine's O2UConfig (`engine_config`).
  CreateScoringJob calls it too, so a bad value is INVALID_ARGUMENT naming the field before anything
  is queued.
- Running: `Engine.resolve` checks that the loaded dataset is one the engine can score (enough
  samples, two classes present: INVALID_ARGUMENT naming the dataset) and fills the config's `auto`
  fields for it and the device; `Engine.score` trains and ranks, handing every epoch's
  ProgressEvent on as a domain Progress. When the training runs in other processes (data-parallel
  workers, or the training process) the dataset's samples move into shared memory first and the
  dataset keeps views of them, so the server holds them once rather than a private copy beside the
  shared one. A checkpoint the engine cannot resume (unreadable, or
  written by another engine version) is deleted and the run starts over: the result is the same.
- Results: `run_info` describes a run by its resolved config (one serialization, recorded before
  training and again, with the report's own figures, when it succeeds); `job_results` turns the
  NoiseReport into the ranked score rows, dataset summary and RunInfo the store keeps.
- Errors: `service_error` maps the engine's exceptions to service errors; `Cancelled` is the one
  the runner catches, and `WorkerFailed` (a data-parallel worker or the training process died or
  timed out) the one it retries, all but `SharedMemoryFull` (the samples did not fit /dev/shm, so
  no worker started): that one fails the job RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import o2u_engine
from o2u_engine import (
    Cancelled,
    ConfigError,
    DataValidationError,
    DeviceOutOfMemory,
    O2UConfig,
    ResolvedConfig,
)
from o2u_engine.accuracy import AccuracyEstimate, label_accuracy, per_class_label_accuracy
from o2u_engine.config import validate_config
from o2u_engine.launch import SharedMemoryFull, WorkerFailed, score_noise_workers, shared_array, shared_tensor
from o2u_engine.phases import plan_phases
from o2u_engine.process import TrainingError, TrainingProcesses
from o2u_engine.validate import MIN_SAMPLES
from o2u_server.datasets import Allocate, LoadedDataset
from o2u_server.domain import (
    ClassNoise,
    CleanRetrainingInfo,
    ConfusedPair,
    DatasetSummary,
    LabelAccuracy,
    Progress,
    RunInfo,
    ScoreTuple,
    SkippedRecords,
    Stage,
)
from o2u_server.errors import Internal, InvalidArgument, ResourceExhausted, ServiceError
from o2u_server.jobs.config_enums import engine_fields
from o2u_server.text import shown

__all__ = [
    "MAX_CONFUSED_PAIRS",
    "Cancelled",
    "Engine",
    "JobResults",
    "SharedMemoryFull",
    "TrainingProcesses",
    "WorkerFailed",
    "check_epochs",
    "check_requested_epochs",
    "engine_config",
    "job_results",
    "run_info",
    "score_noise_workers",
    "service_error",
]

MAX_CONFUSED_PAIRS = 20
logger = logging.getLogger(__name__)

# ---- requests -------------------------------------------------------------------------------------


def _field_named_in(message: str) -> str | None:
    names = [f.name for f in dataclasses.fields(O2UConfig) if f.name in message]
    return max(names, key=len) if names else None  # the longest match: "pretrain_epochs", not "epochs"


def engine_config(requested: Mapping[str, Any]) -> O2UConfig:
    """The O2UConfig for the requested fields; InvalidArgument naming `config.<field>` if invalid."""
    fields = engine_fields(requested)  # the enum fields in the engine's terms
    try:
        config = O2UConfig(**fields)
        validate_config(config)  # ranges only; `auto` fields are resolved once the data is loaded
        return config
    except (ConfigError, TypeError, ValueError) as exc:
        name = getattr(exc, "field", None) or _field_named_in(str(exc))
        raise InvalidArgument(
            f"invalid scoring config: {exc}",
            reason="INVALID_CONFIG",
            field=f"config.{name}" if name else "config",
        ) from exc


def _too_many_epochs(epochs: int, limit: int, what: str) -> ResourceExhausted:
    return ResourceExhausted(
        f"{what} {epochs} training epochs over its stages, more than max_epochs_per_job "
        f"(O2U_MAX_EPOCHS_PER_JOB) = {limit}; ask for fewer pretrain_epochs, cycle_length_epochs or "
        "num_cycles",
        reason="TOO_MANY_EPOCHS",
        metadata={"limit": "max_epochs_per_job"},
    )


def check_requested_epochs(config: O2UConfig, limit: int) -> None:
    """ResourceExhausted (TOO_MANY_EPOCHS) when the epochs a request names explicitly already pass
    `limit`: those left to `auto` count as few as they can (0 pretraining epochs, 1 for a cycle's
    length or count), since the defaults are chosen only once the data is read (`check_epochs`)."""
    pretraining = config.pretrain_epochs or 0
    named = config.cycle_length_epochs is not None or config.num_cycles is not None
    cyclic = (config.cycle_length_epochs or 1) * (config.num_cycles or 1) if named else 0
    epochs = (pretraining + cyclic) * (3 if config.clean_retraining else 1)  # stage 3: two models
    if epochs > limit:
        raise _too_many_epochs(epochs, limit, "the config asks for at least")


def check_epochs(config: ResolvedConfig, num_samples: int, limit: int) -> None:
    """ResourceExhausted (TOO_MANY_EPOCHS) when the config that will run trains more than `limit`
    epochs over all its phases."""
    epochs = sum(phase.epochs for phase in plan_phases(config, num_samples))
    if epochs > limit:
        raise _too_many_epochs(epochs, limit, "the job would train")


# ---- running --------------------------------------------------------------------------------------


def _progress(update: o2u_engine.ProgressEvent) -> Progress:
    return Progress(
        stage=Stage(update.stage),
        epoch=update.epoch,
        epochs_total=update.epochs_total,
        fraction_done=update.fraction_done,
        mean_loss=update.mean_loss,
        learning_rate=update.learning_rate,
        samples_per_second=update.samples_per_second,
        eta_seconds=update.eta_seconds,
    )


@dataclass(frozen=True)
class Engine:
    """The engine's two entry points, called with the server's types (replaceable in tests)."""

    score_noise: Callable[..., o2u_engine.NoiseReport] = o2u_engine.score_noise
    resolve_config: Callable[..., ResolvedConfig] = o2u_engine.resolve_config
    world_size: int = 1  # workers that train one job (`jobs.workers`)
    processes: TrainingProcesses | None = None  # the training processes score_noise runs in, if any

    @property
    def trains_elsewhere(self) -> bool:
        """Whether score_noise trains in other processes, which read the samples from shared memory."""
        return self.processes is not None or self.world_size > 1

    @property
    def allocate(self) -> Allocate:
        """Where a job's loader decodes the samples: shared memory when score_noise trains in other
        processes, so that `share_samples` moves nothing and the samples are never held twice."""
        return shared_array if self.trains_elsewhere else np.empty

    def start(self, devices: Sequence[str]) -> None:
        """Before the first job: start a training process per worker slot (they import torch meanwhile)."""
        if self.processes is not None:
            self.processes.start(devices)

    def close(self) -> None:
        """After the last job: stop the idle training processes."""
        if self.processes is not None:
            self.processes.close()

    def resolve(
        self, requested: Mapping[str, Any], dataset: LoadedDataset, device: str, *, uri: str = "the dataset"
    ) -> ResolvedConfig:
        """The config that will run: the requested fields, every `auto` one chosen for this data."""
        check_scorable(dataset, uri)
        return self.resolve_config(
            engine_config(requested),
            num_samples=len(dataset.labels),
            sample_shape=tuple(dataset.features.shape[1:]),
            num_classes=len(dataset.class_names),
            device=device,
            workers=self.world_size,
        )

    def score(
        self,
        dataset: LoadedDataset,
        config: ResolvedConfig,
        *,
        device: str,
        progress: Callable[[Progress], None],
        should_cancel: Callable[[], bool],
        checkpoint_path: Path,
        checkpoint_interval_seconds: float,
        initial_weights: Path | None,
    ) -> o2u_engine.NoiseReport:
        """Train and rank; `progress` receives one Progress per epoch, from the calling thread.

        Raises Cancelled when `should_cancel` turns true (the checkpoint is kept)."""
        features: np.ndarray[Any, Any] | torch.Tensor = dataset.features
        labels: np.ndarray[Any, Any] | torch.Tensor = dataset.labels
        if self.trains_elsewhere:
            features, labels = share_samples(dataset)

        def run() -> o2u_engine.NoiseReport:
            return self.score_noise(
                features,
                labels,
                config=config,
                num_classes=len(dataset.class_names),
                device=device,
                progress=lambda update: progress(_progress(update)),
                should_cancel=should_cancel,
                checkpoint_path=checkpoint_path,
                checkpoint_interval_seconds=checkpoint_interval_seconds,
                initial_weights=initial_weights,
            )

        try:
            return run()
        except ConfigError as error:
            if getattr(error, "field", None) != "checkpoint_path":
                raise
            # The server's own file, not the caller's problem: start over (same seed, same scores).
            logger.warning("discarding a checkpoint that cannot be resumed: %s", error)
            checkpoint_path.unlink(missing_ok=True)
            return run()


def share_samples(dataset: LoadedDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the dataset's features and labels into shared memory, where other processes read them
    without a copy each, and leave the dataset holding views of them (its own arrays are freed once
    nothing else refers to them): the shared tensors. Features a loader decoded into shared memory
    (`Engine.allocate`) stay where they are. SharedMemoryFull when /dev/shm cannot hold them (the
    dataset is left as it was)."""
    features = shared_tensor(dataset.features)
    labels = shared_tensor(dataset.labels, torch.int64)
    dataset.features, dataset.labels = features.numpy(), labels.numpy()
    return features, labels


def check_scorable(dataset: LoadedDataset, uri: str) -> None:
    """InvalidArgument (INVALID_DATASET) unless the engine can score `dataset`: at least
    MIN_SAMPLES samples and two classes present (the engine would report these as its own
    num_samples/num_classes settings)."""
    count = len(dataset.labels)
    if count < MIN_SAMPLES:
        raise InvalidArgument(
            f"{shown(uri)} holds {count} sample{'s' if count != 1 else ''}; scoring needs at least "
            f"{MIN_SAMPLES}",
            reason="INVALID_DATASET",
            field="dataset",
        )
    if np.count_nonzero(np.bincount(dataset.labels)) < 2:
        raise InvalidArgument(
            f"{shown(uri)}: every sample has the same label; scoring needs at least 2 classes present",
            reason="INVALID_DATASET",
            field="dataset",
        )


def service_error(exc: Exception) -> ServiceError:
    """What a job failed with: service errors as raised, the engine's validation errors as
    INVALID_ARGUMENT, device and host memory as RESOURCE_EXHAUSTED, anything else INTERNAL."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, SharedMemoryFull):
        return ResourceExhausted(
            f"the job's samples ({exc.nbytes:,} bytes decoded) do not fit in the server's shared memory "
            "(/dev/shm), where its training processes read them; try again when fewer jobs are running, "
            "or have the operator raise shm.sizeLimit to hold the largest decoded dataset",
            reason="SHARED_MEMORY_FULL",
        )
    if isinstance(exc, DeviceOutOfMemory):
        return ResourceExhausted(
            f"the device ran out of memory even after halving the batch size: {exc}; lower "
            "pretrain_batch_size/cyclic_batch_size or image_size, or choose a smaller model",
            reason="DEVICE_OUT_OF_MEMORY",
        )
    if isinstance(exc, DataValidationError):
        return InvalidArgument(str(exc), reason="INVALID_DATASET", field="dataset")
    if isinstance(exc, ConfigError):
        return InvalidArgument(str(exc), reason="INVALID_CONFIG", field="config")
    if isinstance(exc, MemoryError):  # an allocation the limits did not foresee; the server goes on
        return ResourceExhausted(
            f"the server ran out of memory for this job ({str(exc) or 'an allocation failed'}); lower "
            "max_decoded_bytes or max_samples, or give the server more memory",
            reason="OUT_OF_MEMORY",
        )
    if isinstance(exc, TrainingError):  # raised in the training process: the message names its type
        return Internal(f"internal error: {exc}", reason="INTERNAL")
    return Internal(f"internal error: {type(exc).__name__}: {exc}", reason="INTERNAL")


# ---- results --------------------------------------------------------------------------------------


def run_info(
    config: ResolvedConfig,
    *,
    device: str,
    num_samples: int,
    num_classes: int,
    server_version: str,
    dataset_digest: str = "",
    engine_version: str = o2u_engine.__version__,
    torch_version: str = torch.__version__,
    world_size: int = 1,
    skipped: Sequence[SkippedRecords] = (),
) -> RunInfo:
    """What runs (or ran), enough to reproduce it: the resolved config, its seed, versions, device,
    and the dataset's records left out."""
    return RunInfo(
        seed=config.seed,
        engine_version=engine_version,
        torch_version=torch_version,
        device=device,
        num_samples=num_samples,
        num_classes=num_classes,
        resolved_config_json=config.to_json(),
        server_version=server_version,
        model=config.model,
        dataset_digest=dataset_digest,
        world_size=world_size,
        skipped=tuple(skipped),
    )


@dataclass(frozen=True)
class JobResults:
    """What the store keeps of a finished run."""

    scores: Iterable[ScoreTuple]  # most suspicious first, produced anew each time it is iterated
    summary: DatasetSummary
    run_info: RunInfo


def job_results(
    report: o2u_engine.NoiseReport,
    dataset: LoadedDataset,
    *,
    job_id: str,
    server_version: str,
    world_size: int = 1,
) -> JobResults:
    info = run_info(
        report.config,
        device=report.device,
        num_samples=report.num_samples,
        num_classes=report.num_classes,
        server_version=server_version,
        dataset_digest=dataset.digest,
        engine_version=report.engine_version,
        torch_version=report.torch_version,
        world_size=world_size,
        skipped=dataset.skipped,
    )
    summary = _summary(report, job_id=job_id, class_names=dataset.class_names, info=info)
    return JobResults(_ScoreRows(report, dataset.keys), summary, info)


@dataclass(frozen=True)
class _ScoreRows:
    """The score rows, generated as the store inserts them; iterable again if a transaction is retried."""

    report: o2u_engine.NoiseReport
    keys: list[str]

    def __iter__(self) -> Iterator[ScoreTuple]:
        return _score_rows(self.report, self.keys)


def _score_rows(report: o2u_engine.NoiseReport, keys: list[str]) -> Iterator[ScoreTuple]:
    """One row per sample, most suspicious first, in the store's column order."""
    order = report.order().tolist()
    # tolist() once per array: indexing NumPy scalars per sample would dominate for large N.
    ranks = report.ranks.tolist()
    labels = report.labels.tolist()
    scores = report.noise_scores.tolist()
    variances = report.score_variance.tolist()
    probabilities = report.noise_probability.tolist()
    suspected = report.suspected.tolist()
    suggested = report.suggested_labels.tolist()
    confidences = report.suggested_label_confidence.tolist()
    for i in order:
        yield (
            int(ranks[i]),
            int(i),
            keys[i],
            int(labels[i]),
            float(scores[i]),
            float(variances[i]),
            float(probabilities[i]),
            bool(suspected[i]),
            int(suggested[i]),
            float(confidences[i]),
        )


def _confused_pairs(report: o2u_engine.NoiseReport) -> list[ConfusedPair]:
    mask = report.suspected & (report.labels != report.suggested_labels)
    pairs = Counter(zip(report.labels[mask].tolist(), report.suggested_labels[mask].tolist(), strict=True))
    ranked = sorted(pairs.items(), key=lambda item: (-item[1], item[0]))
    return [
        ConfusedPair(int(given), int(suggested), count)
        for (given, suggested), count in ranked[:MAX_CONFUSED_PAIRS]
    ]


def _summary(
    report: o2u_engine.NoiseReport, *, job_id: str, class_names: list[str], info: RunInfo
) -> DatasetSummary:
    classes = [
        ClassNoise(
            label=label,
            name=class_names[label] if label < len(class_names) else str(label),
            count=int(report.class_counts[label]),
            suspected=int(report.class_suspected[label]),
            noise_rate=float(report.class_noise_rates[label]),
        )
        for label in range(report.num_classes)
    ]
    retraining = CleanRetrainingInfo()
    if report.clean_retraining is not None:
        result = report.clean_retraining
        retraining = CleanRetrainingInfo(
            ran=True,
            accuracy_without_removal=float(result.accuracy_without_removal),
            accuracy_with_removal=float(result.accuracy_with_removal),
            removed=int(result.removed),
        )
    summary = DatasetSummary(
        job_id=job_id,
        num_samples=len(report.labels),
        num_classes=report.num_classes,
        class_names=list(class_names),
        estimated_noise_rate=float(report.estimated_noise_rate),
        noise_rate_used=float(report.noise_rate_used),
        num_suspected=int(report.suspected.sum()),
        classes=classes,
        transition_matrix=[float(value) for value in report.transition_matrix.reshape(-1)],
        confused_pairs=_confused_pairs(report),
        clean_retraining=retraining,
        run_info=info,
        noise_rate_capped=bool(report.noise_rate_capped),
    )
    return with_label_accuracy(summary, report)


# The label-accuracy estimates of a summary, overall and per class: a Poisson-binomial count of wrong
# labels from the per-sample noise probabilities (o2u_engine.accuracy: exact up to 4096 samples, else
# the normal approximation; a 95% central interval). Acceptance gates in the clients read these.
def _label_accuracy(estimate: AccuracyEstimate) -> LabelAccuracy:
    return LabelAccuracy(
        mean=estimate.mean,
        lower=estimate.lower,
        upper=estimate.upper,
        level=estimate.level,
        method=estimate.method,
        num_samples=estimate.num_samples,
    )


def with_label_accuracy(summary: DatasetSummary, report: o2u_engine.NoiseReport) -> DatasetSummary:
    per_class = per_class_label_accuracy(report.noise_probability, report.labels, report.num_classes)
    classes = [
        dataclasses.replace(c, label_accuracy=_label_accuracy(per_class[c.label]))
        if c.label < len(per_class)
        else c
        for c in summary.classes
    ]
    overall = _label_accuracy(label_accuracy(report.noise_probability))
    return dataclasses.replace(summary, classes=classes, label_accuracy=overall)
