"""O2U-Net hyperparameters (one frozen dataclass) and the rules that fill its `auto` fields.

`O2UConfig` mirrors the proto's ScoringConfig plus a few engine-only knobs (numeric precision,
compilation, data placement). `None` or `"auto"` means "choose from the data and the device";
`resolve_config` makes every such choice explicit, so the resolved config stored with a result is
enough to reproduce it. The rules are in `resolve_config`'s docstring.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

import torch

from o2u_engine.errors import ConfigError
from o2u_engine.layout import SampleLayout, infer_layout
from o2u_engine.runtime import cpu_has_fast_bf16, free_memory_bytes, resolve_device

MODELS = ("auto", "mlp", "small_cnn", "cnn9", "resnet18", "resnet34", "resnet50")
PRECISIONS = ("auto", "fp32", "bf16")
PLACEMENTS = ("auto", "resident", "streamed")
# torch.compile modes; "reduce-overhead" replays each training step as a CUDA graph
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")

# Resolution rules (see resolve_config). Steps are optimizer steps (batches).
PRETRAIN_TARGET_STEPS = 300  # enough to fit the clean majority, few enough not to memorize noise
PRETRAIN_MIN_EPOCHS = 5  # every sample is seen a few times even when one epoch is many steps
PRETRAIN_MAX_EPOCHS = 40  # tiny datasets: more epochs would only memorize the wrong labels
HUGE_DATASET = 1_000_000  # samples; from here epochs are capped harder, one epoch is many steps
LARGE_DATASET = 20_000  # samples; from here the reference cycle length c = 10 is used
MAX_BATCH_FEATURES = 512  # samples; an MLP head on vectors is cheap per sample
MAX_BATCH_IMAGES = 128  # samples; the reference stage-1 batch size
MIN_AUTO_BATCH = 16  # samples
CPU_MAX_IMAGE_SIZE = 32  # pixels; keeps a 3,000-image CPU job under two minutes on two cores
CUDA_MAX_IMAGE_SIZE = 64  # pixels; the convolutional models keep full resolution up to here
CNN9_MIN_IMAGE_SIZE = 28  # pixels; its three unpadded 3x3 convolutions after two poolings
CNN9_AUTO_MIN_IMAGE_SIZE = 32  # pixels; smaller images are upscaled to the CIFAR size
MIN_IMAGE_SIZE = 8  # pixels
STREAM_CHUNK_BYTES = 256 * 2**20  # host-to-device copy size on the streamed path
RESIDENT_MEMORY_FRACTION = 0.5  # of free device (or host) memory the resident tensor may take


@dataclass(frozen=True)
class O2UConfig:
    """O2U-Net hyperparameters; `None`/`"auto"` fields are filled by `resolve_config`."""

    model: str = "auto"  # auto | mlp | small_cnn | cnn9 | resnet18 | resnet34 | resnet50
    seed: int = 0  # same seed, data and device -> same scores
    pretrain_epochs: int | None = None  # stage 1 length, epochs
    pretrain_learning_rate: float = 0.01  # stage 1 SGD learning rate (fixed)
    cycle_length_epochs: int | None = None  # stage 2 cycle length c, epochs
    num_cycles: int | None = None  # stage 2 length = c * num_cycles epochs
    cycle_max_learning_rate: float = 0.01  # r1, rate at the start of a cycle
    cycle_min_learning_rate: float = 0.001  # r2, rate at the end of a cycle
    pretrain_batch_size: int | None = None  # samples per step in stages 1 and 3
    cyclic_batch_size: int | None = None  # samples per step in stage 2 (smaller than stage 1)
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # SGD L2 penalty coefficient
    augment: bool | None = None  # random crop + horizontal flip; auto: images yes, features no
    noise_rate: float | None = None  # known fraction of wrong labels in [0, 1); None/0: estimate
    class_aware_normalization: bool = False  # subtract per-class (not global) epoch mean loss
    clean_retraining: bool = False  # run stage 3
    image_size: int | None = None  # side of the square model input, pixels; None/0: auto
    validation_fraction: float = 0.0  # held out in stage 3, in [0, 0.5); 0 -> 0.1 when stage 3 runs
    # Engine-only knobs (not in the proto).
    precision: str = "auto"  # auto | fp32 | bf16 (autocast); auto: bf16 where it is faster
    compile_model: bool = False  # torch.compile the model (start-up cost; pays off on long GPU runs)
    compile_mode: str = "default"  # with compile_model: default | reduce-overhead (CUDA graphs) | ...
    data_placement: str = "auto"  # auto | resident | streamed; auto: resident when it fits
    stream_chunk_samples: int | None = None  # samples per host-to-device copy when streamed

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> O2UConfig:
        """Build a config from a dict (e.g. parsed `to_json` output); unknown keys are refused."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown configuration field", field=unknown[0])
        return cls(**values)


def _check_int(config: O2UConfig, name: str, low: int, high: int, *, optional: bool = False) -> None:
    value = getattr(config, name)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name}: expected an integer in [{low}, {high}], got {value!r}", field=name)


def _check_float(
    config: O2UConfig,
    name: str,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
) -> None:
    value = getattr(config, name)
    if value is None and optional:
        return
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    ok = is_number and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(f"{name}: expected a number in {interval}, got {value!r}", field=name)


def _check_choice(config: O2UConfig, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(config, name)
    if value not in choices:
        raise ConfigError(f"{name}: expected one of {', '.join(choices)}, got {value!r}", field=name)


def _check_bool(config: O2UConfig, name: str, *, optional: bool = False) -> None:
    value = getattr(config, name)
    if not (isinstance(value, bool) or (optional and value is None)):
        raise ConfigError(f"{name}: expected true or false, got {value!r}", field=name)


def validate_config(config: O2UConfig) -> None:
    """Raise ConfigError naming the first field outside its allowed range."""
    _check_choice(config, "model", MODELS)
    _check_int(config, "seed", 0, 2**63 - 1)
    _check_int(config, "pretrain_epochs", 0, 10_000, optional=True)
    _check_float(config, "pretrain_learning_rate", 0.0, 10.0, low_open=True)
    _check_int(config, "cycle_length_epochs", 1, 1_000, optional=True)
    _check_int(config, "num_cycles", 1, 1_000, optional=True)
    _check_float(config, "cycle_max_learning_rate", 0.0, 10.0, low_open=True)
    _check_float(config, "cycle_min_learning_rate", 0.0, 10.0, low_open=True)
    if config.cycle_min_learning_rate > config.cycle_max_learning_rate:
        raise ConfigError(
            f"cycle_min_learning_rate: expected a value <= cycle_max_learning_rate "
            f"({config.cycle_max_learning_rate}), got {config.cycle_min_learning_rate}",
            field="cycle_min_learning_rate",
        )
    _check_int(config, "pretrain_batch_size", 2, 65_536, optional=True)
    _check_int(config, "cyclic_batch_size", 2, 65_536, optional=True)
    _check_float(config, "momentum", 0.0, 1.0, high_open=True)
    _check_float(config, "weight_decay", 0.0, 1.0, high_open=True)
    _check_bool(config, "augment", optional=True)
    _check_float(config, "noise_rate", 0.0, 1.0, high_open=True, optional=True)
    _check_bool(config, "class_aware_normalization")
    _check_bool(config, "clean_retraining")
    if config.image_size != 0:
        _check_int(config, "image_size", MIN_IMAGE_SIZE, 1_024, optional=True)
    _check_float(config, "validation_fraction", 0.0, 0.5, high_open=True)
    _check_choice(config, "precision", PRECISIONS)
    _check_bool(config, "compile_model")
    _check_choice(config, "compile_mode", COMPILE_MODES)
    if config.compile_mode != "default" and not config.compile_model:
        raise ConfigError(
            f"compile_mode: {config.compile_mode!r} applies only with compile_model=True",
            field="compile_mode",
        )
    _check_choice(config, "data_placement", PLACEMENTS)
    _check_int(config, "stream_chunk_samples", 1, 2**31 - 1, optional=True)


def resolved_int(config: O2UConfig, name: str) -> int:
    """An integer field of a resolved config; a ValueError if `resolve_config` has not filled it."""
    value = getattr(config, name)
    if not isinstance(value, int):
        raise ValueError(f"config.{name} is {value!r}; pass the config through resolve_config first")
    return value


def _auto_model(layout: SampleLayout, device: torch.device) -> str:
    if not layout.is_images:
        return "mlp"
    if device.type != "cuda":
        return "small_cnn"
    if layout.side < CNN9_MIN_IMAGE_SIZE:
        return "small_cnn"
    return "cnn9" if layout.side <= CUDA_MAX_IMAGE_SIZE else "resnet18"


def _auto_image_size(layout: SampleLayout, model: str, device: torch.device) -> int:
    cap = CUDA_MAX_IMAGE_SIZE if device.type == "cuda" else CPU_MAX_IMAGE_SIZE
    floor = CNN9_AUTO_MIN_IMAGE_SIZE if model == "cnn9" else MIN_IMAGE_SIZE
    return max(floor, min(layout.side, cap))


def resolve_config(
    config: O2UConfig,
    *,
    num_samples: int,
    sample_shape: tuple[int, ...],
    num_classes: int,
    device: str | torch.device,
) -> O2UConfig:
    """Fill every `auto`/`None` field from the data and the device; idempotent.

    Rules (N samples, B1/B2 the stage 1/2 batch sizes, one step = one batch):
    - model: `mlp` for `(N, D)` features. Images: `small_cnn` on CPU; on CUDA `cnn9` up to 64 px
      (`small_cnn` below 28 px, which cnn9 cannot take), else `resnet18`.
    - image_size: the longer image side, capped at 32 px on CPU (so a 3,000-image CPU job trains
      in under two minutes on two cores) and 64 px on CUDA; at least 8 px, and 32 px for cnn9.
    - augment: on for images (random crop + flip, as in the reference), off for features.
    - batch sizes: B1 = clamp(N // 16, 16, 128 for images or 512 for features), so even small
      datasets get at least 16 steps per epoch; B2 = B1 // 2 (O2U uses a smaller stage-2 batch).
    - pretrain_epochs: enough epochs for 300 steps, clamped to [5, 40] ([2, 40] from 1M samples).
      300 steps fit the clean majority; longer pre-training starts memorizing the wrong labels,
      which is exactly what the scores must not reflect.
    - cycles: c = 5 epochs and 3 cycles below 20k samples, the reference c = 10 with 2 cycles
      below 1M, and c = 5 with 2 cycles above (each epoch is then many thousands of steps).
    - validation_fraction: 0.1 when clean_retraining is on and none was given.
    - precision: bf16 autocast on CUDA (when supported) and on CPUs with native bf16 for the
      convolutional models (measured about 2x faster); fp32 otherwise.
    - data_placement: the whole prepared dataset stays on the device when it takes at most half
      of the free device memory (host memory for CPU), else it is streamed in chunks of
      `stream_chunk_samples` (about 256 MiB of samples by default).
    """
    validate_config(config)
    if num_samples < 1:
        raise ConfigError(f"num_samples: expected >= 1, got {num_samples}", field="num_samples")
    if num_classes < 2:
        raise ConfigError(f"num_classes: expected >= 2, got {num_classes}", field="num_classes")
    layout = infer_layout(tuple(sample_shape))
    torch_device = resolve_device(device)

    model = _auto_model(layout, torch_device) if config.model == "auto" else config.model
    if not layout.is_images and model != "mlp":
        raise ConfigError(f"model: feature vectors need 'mlp', got {model!r}", field="model")
    image_size: int | None = None
    if layout.is_images:
        image_size = config.image_size or _auto_image_size(layout, model, torch_device)
        if model == "cnn9" and image_size < CNN9_MIN_IMAGE_SIZE:
            raise ConfigError(
                f"image_size: cnn9 needs at least {CNN9_MIN_IMAGE_SIZE} px, got {image_size}",
                field="image_size",
            )
    elif config.image_size:
        raise ConfigError(
            "image_size: applies to images only; the samples are feature vectors", field="image_size"
        )
    augment = layout.is_images if config.augment is None else config.augment
    if augment and not layout.is_images:
        raise ConfigError("augment: random crop and flip apply to images only", field="augment")

    batch_cap = MAX_BATCH_IMAGES if layout.is_images else MAX_BATCH_FEATURES
    pretrain_batch = config.pretrain_batch_size or min(batch_cap, max(MIN_AUTO_BATCH, num_samples // 16))
    cyclic_batch = config.cyclic_batch_size or max(2, pretrain_batch // 2)
    pretrain_epochs = config.pretrain_epochs
    if pretrain_epochs is None:
        steps_per_epoch = math.ceil(num_samples / pretrain_batch)
        min_epochs = 2 if num_samples >= HUGE_DATASET else PRETRAIN_MIN_EPOCHS
        wanted = math.ceil(PRETRAIN_TARGET_STEPS / steps_per_epoch)
        pretrain_epochs = min(PRETRAIN_MAX_EPOCHS, max(min_epochs, wanted))
    if num_samples < LARGE_DATASET:
        default_cycle, default_cycles = 5, 3
    elif num_samples < HUGE_DATASET:
        default_cycle, default_cycles = 10, 2
    else:
        default_cycle, default_cycles = 5, 2
    validation_fraction = config.validation_fraction
    if config.clean_retraining and validation_fraction == 0.0:
        validation_fraction = 0.1

    if config.precision != "auto":
        precision = config.precision
    elif torch_device.type == "cuda":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    else:
        precision = "bf16" if model not in ("mlp",) and cpu_has_fast_bf16() else "fp32"

    if layout.is_images:
        assert image_size is not None
        sample_bytes = layout.channels * image_size * image_size  # uint8 pixels
    else:
        sample_bytes = 4 * layout.feature_dim  # float32
    # A chunk is read in the caller's dtype before it is converted; 4 bytes per value bounds it for
    # float32 inputs and leaves headroom for uint8 ones.
    chunk_sample_bytes = max(sample_bytes, 4 * math.prod(sample_shape))
    stream_chunk = config.stream_chunk_samples or max(
        pretrain_batch, STREAM_CHUNK_BYTES // chunk_sample_bytes
    )
    placement = config.data_placement
    if placement == "auto":
        budget = RESIDENT_MEMORY_FRACTION * free_memory_bytes(torch_device)
        placement = "resident" if num_samples * sample_bytes <= budget else "streamed"

    return dataclasses.replace(
        config,
        model=model,
        pretrain_epochs=pretrain_epochs,
        pretrain_learning_rate=float(config.pretrain_learning_rate),
        cycle_length_epochs=config.cycle_length_epochs or default_cycle,
        num_cycles=config.num_cycles or default_cycles,
        cycle_max_learning_rate=float(config.cycle_max_learning_rate),
        cycle_min_learning_rate=float(config.cycle_min_learning_rate),
        pretrain_batch_size=pretrain_batch,
        cyclic_batch_size=cyclic_batch,
        momentum=float(config.momentum),
        weight_decay=float(config.weight_decay),
        augment=augment,
        noise_rate=None if not config.noise_rate else float(config.noise_rate),
        image_size=image_size,
        validation_fraction=float(validation_fraction),
        precision=precision,
        data_placement=placement,
        stream_chunk_samples=stream_chunk,
    )
