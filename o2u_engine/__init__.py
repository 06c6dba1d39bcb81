"""o2u_engine: find mislabeled training samples with O2U-Net (Huang et al., ICCV 2019).

Arrays in, a ranked report out; no network services, no environment variables. A network is
pre-trained on the noisy labels (stage 1), then trained on with a cyclic learning rate while
every sample's loss is recorded (stage 2); a sample's noise score is its mean loss relative to
the epoch's mean, and high scores mean likely mislabeled. Optionally (stage 3) two fresh networks
are trained with and without the suspected samples and compared on a held-out split.

Public API:

- `score_noise(features, labels, *, config, num_classes, device, progress, should_cancel,
  checkpoint_path, initial_weights) -> NoiseReport`: validates the inputs (DataValidationError,
  ConfigError), resolves the configuration, trains, ranks.
- `O2UConfig`: frozen hyperparameters; `resolve_config(config, num_samples=, sample_shape=,
  num_classes=, device=, workers=1)` fills its `auto` fields (rules in its docstring) and returns a
  `ResolvedConfig`, an O2UConfig with no optional field left.
- `NoiseReport`: per-sample `noise_scores`, `ranks`, `noise_probability`, `suspected`,
  `suggested_labels` (+ confidence); per-class noise rates, the noise transition matrix,
  `estimated_noise_rate`, stage 3's `clean_retraining`, and what produced it (`config`, `seed`,
  `engine_version`, `torch_version`, `device`, `timings`); `order()` and `config_json()`.
- `ProgressEvent` (one per epoch), `CleanRetrainingResult`.
- Errors: `DataValidationError`, `ConfigError` (and its `TrainingDiverged`), `Cancelled`,
  `DeviceOutOfMemory`.
- Data-parallel training: `o2u_engine.launch.score_noise_workers(features, labels, world_size=,
  device=, ...)` runs `score_noise` on `world_size` torch.distributed workers (gloo on the CPU,
  NCCL on GPUs; `o2u_engine.distributed` states the rule) and raises `WorkerFailed` when one dies
  or hangs (its subclass `SharedMemoryFull` when /dev/shm cannot hold the samples, before any
  starts), the engine's errors as themselves, and `TrainingError` for an exception not the engine's.
- Training in child processes: `o2u_engine.process.TrainingProcesses().score_noise(features,
  labels, device=, ...)` runs the same call in a long-lived child process kept per device (the same
  report; `WorkerFailed` when the child dies, `TrainingError` for an exception not the engine's).
- Utilities: `configure_cpu_threads()` (call it once in a CPU service), `cyclic_lr`, `build_model`,
  `prepare_images`, `prepare_features`.

Example (feature vectors of three classes, 10% of the labels flipped):

>>> import numpy as np
>>> from o2u_engine import O2UConfig, score_noise
>>> rng = np.random.default_rng(0)
>>> true_labels = rng.integers(0, 3, size=300)
>>> features = (rng.normal(size=(3, 8)) * 3)[true_labels] + rng.normal(size=(300, 8))
>>> labels = true_labels.copy()
>>> labels[:30] = (true_labels[:30] + 1) % 3  # the first 30 labels are wrong
>>> report = score_noise(features.astype(np.float32), labels, config=O2UConfig(seed=0))
>>> report.config.model, report.noise_scores.shape
('mlp', (300,))
>>> found = np.isin(report.order()[:30], np.arange(30)).mean()  # precision among the top 30
>>> bool(found >= 0.9)
True
"""

from o2u_engine.config import O2UConfig, ResolvedConfig
from o2u_engine.data import prepare_features, prepare_images
from o2u_engine.errors import Cancelled, ConfigError, DataValidationError, DeviceOutOfMemory, TrainingDiverged
from o2u_engine.models import build_model
from o2u_engine.report import CleanRetrainingResult, NoiseReport, ProgressEvent
from o2u_engine.resolve import resolve_config
from o2u_engine.runtime import available_cpu_count, configure_cpu_threads
from o2u_engine.schedule import cyclic_lr
from o2u_engine.score import score_noise
from o2u_engine.version import __version__

__all__ = [
    "Cancelled",
    "CleanRetrainingResult",
    "ConfigError",
    "DataValidationError",
    "DeviceOutOfMemory",
    "NoiseReport",
    "O2UConfig",
    "ProgressEvent",
    "ResolvedConfig",
    "TrainingDiverged",
    "__version__",
    "available_cpu_count",
    "build_model",
    "configure_cpu_threads",
    "cyclic_lr",
    "prepare_features",
    "prepare_images",
    "resolve_config",
    "score_noise",
]
