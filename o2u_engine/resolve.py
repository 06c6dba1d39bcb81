"""The rules that fill a config's `auto` fields from the data and the device, one function each.

`resolve_config` lists the rules in its docstring and applies them in that order; each
`_auto_*` function is one bullet of it, keeps an explicit value as given, and raises the
ConfigError of a combination that cannot run.
"""

from __future__ import annotations

import math

import torch

from o2u_engine.config import MIN_IMAGE_SIZE, O2UConfig, ResolvedConfig, validate_config
from o2u_engine.errors import ConfigError
from o2u_engine.layout import SampleLayout, infer_layout
from o2u_engine.runtime import cpu_has_fast_bf16, free_memory_bytes, resolve_device

# Steps are optimizer steps (batches).
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
STREAM_CHUNK_BYTES = 256 * 2**20  # host-to-device copy size on the streamed path
# (stage 1, r1, r2) learning rates: the paper's, and small_cnn's from a sweep on CIFAR-10N with
# a 16-epoch stage 1 (higher rates keep the small network from memorizing the wrong labels)
PAPER_RATES = (0.01, 0.01, 0.001)
SMALL_CNN_RATES = (0.2, 0.2, 0.02)
# small_cnn's stage 1 in epochs: 16 at CIFAR's 32 px (CIFAR-10N sweep); small images such as 8x8
# digits are fitted, and their wrong labels memorized, sooner (digits: AUROC 0.963 at 16, 0.996 at 8)
SMALL_CNN_PRETRAIN_EPOCHS = 16
SMALL_CNN_SMALL_IMAGE_PRETRAIN_EPOCHS = 8
SMALL_CNN_SMALL_IMAGE = 16  # pixels; model inputs below this side are small images
# Default augmentations, both class-preserving (never a flip): none from 16 px (CIFAR-10N, 1,500
# images: AUROC 0.799 none, 0.772 crop), a crop for smaller inputs, which stage 1 fits and
# memorizes sooner (8x8 digits, four noise settings: mean AUROC 0.879 none, 0.933 crop)
DEFAULT_IMAGE_AUGMENTATION = "none"
DEFAULT_SMALL_IMAGE_AUGMENTATION = "crop"
RESIDENT_MEMORY_FRACTION = 0.5  # of free device (or host) memory the resident tensor may take


def resolve_config(
    config: O2UConfig,
    *,
    num_samples: int,
    sample_shape: tuple[int, ...],
    num_classes: int,
    device: str | torch.device,
    workers: int = 1,
) -> ResolvedConfig:
    """Fill every `auto`/`None` field from the data and the device; idempotent. `workers` is the
    data-parallel world size the run trains on (one device each, or sharing the host's memory).

    Rules (N samples, B1/B2 the stage 1/2 batch sizes, one step = one batch):
    - model: `mlp` for `(N, D)` features. Images: `small_cnn` on CPU; on CUDA `cnn9` up to 64 px
      (`small_cnn` below 28 px, which cnn9 cannot take), else `resnet18`.
    - image_size: the longer image side, capped at 32 px on CPU (so a 3,000-image CPU job trains
      in under two minutes on two cores) and 64 px on CUDA; at least 8 px, and 32 px for cnn9.
    - augment: `none` for features and images from 16 px, `crop` for smaller images. The
      reference trains with crop + flip, but a flip can change a class (text, digits, symbols)
      and on real label noise (CIFAR-10N) none ranked best, then crop, then crop + flip; small
      images (8x8 digits) gain from a crop. `crop_flip` only when asked; True means `crop`.
    - score: `aum` for images, `loss_margin` (the mean rank by the paper's loss and by the
      margin) for feature vectors.
    - batch sizes: B1 = clamp(N // 16, 16, 128 for images or 512 for features), so even small
      datasets get at least 16 steps per epoch; B2 = B1 // 2 (O2U uses a smaller stage-2 batch).
    - learning rates: small_cnn 0.2 in stage 1, r1 = 0.2, r2 = 0.02 (a CIFAR-10N sweep); the
      paper's 0.01, 0.01, 0.001 for the other models.
    - pretrain_epochs: small_cnn 16, or 8 for inputs under 16 px (below 1M samples). Others:
      enough epochs for 300 steps, clamped to [5, 40] ([2, 40] from 1M samples).
      300 steps fit the clean majority; longer pre-training starts memorizing the wrong labels,
      which is exactly what the scores must not reflect.
    - cycles: c = 5 epochs and 3 cycles below 20k samples, the reference c = 10 with 2 cycles
      below 1M, and c = 5 with 2 cycles above (each epoch is then many thousands of steps).
    - validation_fraction: 0.1 when clean_retraining is on and none was given.
    - precision: bf16 autocast on CUDA (when supported) and on CPUs with native bf16 for the
      convolutional models (measured about 2x faster); fp32 otherwise.
    - data_placement: the whole prepared dataset stays on the device when it takes at most half
      of the free device memory, else it is streamed in chunks of `stream_chunk_samples` (about
      256 MiB of samples by default). On the CPU the free memory is the host's, within the
      container's limit, and `workers` CPU workers each hold a copy: each may take 1/workers of it.
    """
    validate_config(config)
    if num_samples < 1:
        raise ConfigError(f"num_samples: expected >= 1, got {num_samples}", field="num_samples")
    if num_classes < 2:
        raise ConfigError(f"num_classes: expected >= 2, got {num_classes}", field="num_classes")
    layout = infer_layout(tuple(sample_shape))
    torch_device = resolve_device(device)

    model = _auto_model(config, layout, torch_device)
    image_size = _auto_image_size(config, layout, model, torch_device)
    augment = _auto_augment(config, layout, image_size)
    pretrain_batch, cyclic_batch = _auto_batch_sizes(config, layout, num_samples)
    cycle_length, num_cycles = _auto_cycles(config, num_samples)
    sample_bytes = _stored_sample_bytes(layout, image_size)
    rates = _auto_learning_rates(config, model)
    return ResolvedConfig(
        model=model,
        seed=config.seed,
        pretrain_epochs=_auto_pretrain_epochs(config, num_samples, pretrain_batch, model, image_size),
        pretrain_learning_rate=float(config.pretrain_learning_rate or rates[0]),
        cycle_length_epochs=cycle_length,
        num_cycles=num_cycles,
        cycle_max_learning_rate=float(config.cycle_max_learning_rate or rates[1]),
        cycle_min_learning_rate=float(config.cycle_min_learning_rate or rates[2]),
        pretrain_batch_size=pretrain_batch,
        cyclic_batch_size=cyclic_batch,
        momentum=float(config.momentum),
        weight_decay=float(config.weight_decay),
        augment=augment,
        score=_auto_score(config, layout),
        noise_rate=float(config.noise_rate or 0.0),
        class_aware_normalization=config.class_aware_normalization,
        clean_retraining=config.clean_retraining,
        image_size=image_size,
        validation_fraction=_auto_validation_fraction(config),
        precision=_auto_precision(config, model, torch_device),
        compile_model=config.compile_model,
        compile_mode=config.compile_mode,
        data_placement=_auto_placement(config, num_samples, sample_bytes, torch_device, workers),
        stream_chunk_samples=_auto_stream_chunk(config, sample_shape, sample_bytes, pretrain_batch),
    )


def _auto_model(config: O2UConfig, layout: SampleLayout, device: torch.device) -> str:
    if config.model != "auto":
        if not layout.is_images and config.model != "mlp":
            raise ConfigError(f"model: feature vectors need 'mlp', got {config.model!r}", field="model")
        return config.model
    if not layout.is_images:
        return "mlp"
    if device.type != "cuda" or layout.side < CNN9_MIN_IMAGE_SIZE:
        return "small_cnn"
    return "cnn9" if layout.side <= CUDA_MAX_IMAGE_SIZE else "resnet18"


def _auto_image_size(config: O2UConfig, layout: SampleLayout, model: str, device: torch.device) -> int:
    """The model input side in pixels; 0 for feature vectors."""
    if not layout.is_images:
        if config.image_size:
            raise ConfigError(
                "image_size: applies to images only; the samples are feature vectors", field="image_size"
            )
        return 0
    if config.image_size:
        image_size = config.image_size
    else:
        cap = CUDA_MAX_IMAGE_SIZE if device.type == "cuda" else CPU_MAX_IMAGE_SIZE
        floor = CNN9_AUTO_MIN_IMAGE_SIZE if model == "cnn9" else MIN_IMAGE_SIZE
        image_size = max(floor, min(layout.side, cap))
    if model == "cnn9" and image_size < CNN9_MIN_IMAGE_SIZE:
        raise ConfigError(
            f"image_size: cnn9 needs at least {CNN9_MIN_IMAGE_SIZE} px, got {image_size}", field="image_size"
        )
    return image_size


def _auto_augment(config: O2UConfig, layout: SampleLayout, image_size: int) -> str:
    """The augmentation as one of AUGMENTATIONS; the legacy True is a crop, never a flip."""
    if config.augment is None:
        if not layout.is_images:
            return "none"
        small = image_size < SMALL_CNN_SMALL_IMAGE
        return DEFAULT_SMALL_IMAGE_AUGMENTATION if small else DEFAULT_IMAGE_AUGMENTATION
    augment = config.augment
    if isinstance(augment, bool):
        augment = "crop" if augment else "none"
    if augment != "none" and not layout.is_images:
        raise ConfigError(f"augment: {augment!r} applies to images only", field="augment")
    return augment


def _auto_score(config: O2UConfig, layout: SampleLayout) -> str:
    """aum for images (CIFAR-10N and digit images); for feature vectors the loss-margin rank mean:
    it ranked above the paper's loss on CIFAR-10N embeddings (AUROC + 0.001 to + 0.013), digits
    as features (+ 0.000 to + 0.006) and every synthetic set but 100,000 x 512 (- 0.0003), while
    the margin alone ranks below the loss on every 512-d set (docs/benchmarks.md)."""
    if config.score != "auto":
        return config.score
    return "aum" if layout.is_images else "loss_margin"


def _auto_batch_sizes(config: O2UConfig, layout: SampleLayout, num_samples: int) -> tuple[int, int]:
    """(B1, B2): the stage 1 (and 3) and the stage 2 batch sizes, samples."""
    cap = MAX_BATCH_IMAGES if layout.is_images else MAX_BATCH_FEATURES
    pretrain_batch = config.pretrain_batch_size or min(cap, max(MIN_AUTO_BATCH, num_samples // 16))
    return pretrain_batch, config.cyclic_batch_size or max(2, pretrain_batch // 2)


def _auto_learning_rates(config: O2UConfig, model: str) -> tuple[float, float, float]:
    """(stage 1 rate, r1, r2) defaults for the model; an explicit r1 below the default r2 lowers r2
    to r1 / 10 so a lone r1 stays valid."""
    stage1, r1, r2 = SMALL_CNN_RATES if model == "small_cnn" else PAPER_RATES
    max_rate = config.cycle_max_learning_rate or r1
    min_rate = config.cycle_min_learning_rate or (r2 if r2 <= max_rate else max_rate / 10)
    if config.cycle_min_learning_rate and config.cycle_max_learning_rate is None and min_rate > max_rate:
        max_rate = min_rate
    return stage1, max_rate, min_rate


def _auto_pretrain_epochs(
    config: O2UConfig, num_samples: int, pretrain_batch: int, model: str, image_size: int
) -> int:
    if config.pretrain_epochs is not None:
        return config.pretrain_epochs
    if model == "small_cnn" and num_samples < HUGE_DATASET:
        if image_size < SMALL_CNN_SMALL_IMAGE:
            return SMALL_CNN_SMALL_IMAGE_PRETRAIN_EPOCHS
        return SMALL_CNN_PRETRAIN_EPOCHS
    steps_per_epoch = math.ceil(num_samples / pretrain_batch)
    min_epochs = 2 if num_samples >= HUGE_DATASET else PRETRAIN_MIN_EPOCHS
    wanted = math.ceil(PRETRAIN_TARGET_STEPS / steps_per_epoch)
    return min(PRETRAIN_MAX_EPOCHS, max(min_epochs, wanted))


def _auto_cycles(config: O2UConfig, num_samples: int) -> tuple[int, int]:
    """(c, number of cycles) of stage 2."""
    if num_samples < LARGE_DATASET:
        default_cycle, default_cycles = 5, 3
    elif num_samples < HUGE_DATASET:
        default_cycle, default_cycles = 10, 2
    else:
        default_cycle, default_cycles = 5, 2
    return config.cycle_length_epochs or default_cycle, config.num_cycles or default_cycles


def _auto_validation_fraction(config: O2UConfig) -> float:
    if config.clean_retraining and config.validation_fraction == 0.0:
        return 0.1
    return float(config.validation_fraction)


def _auto_precision(config: O2UConfig, model: str, device: torch.device) -> str:
    if config.precision != "auto":
        return config.precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if model != "mlp" and cpu_has_fast_bf16() else "fp32"


def _stored_sample_bytes(layout: SampleLayout, image_size: int) -> int:
    """Bytes of one prepared sample: uint8 pixels at `image_size`, or float32 features."""
    if layout.is_images:
        return layout.channels * image_size * image_size
    return 4 * layout.feature_dim


def _auto_placement(
    config: O2UConfig, num_samples: int, sample_bytes: int, device: torch.device, workers: int
) -> str:
    if config.data_placement != "auto":
        return config.data_placement
    budget = RESIDENT_MEMORY_FRACTION * free_memory_bytes(device)
    if device.type == "cpu":  # every worker keeps its resident copy in the same host memory
        budget /= max(1, workers)
    return "resident" if num_samples * sample_bytes <= budget else "streamed"


def _auto_stream_chunk(
    config: O2UConfig, sample_shape: tuple[int, ...], sample_bytes: int, pretrain_batch: int
) -> int:
    """Samples per host-to-device copy when streamed: about 256 MiB, at least one stage-1 batch."""
    # A chunk is read in the caller's dtype before it is converted; 4 bytes per value bounds it for
    # float32 inputs and leaves headroom for uint8 ones.
    chunk_sample_bytes = max(sample_bytes, 4 * math.prod(sample_shape))
    return config.stream_chunk_samples or max(pretrain_batch, STREAM_CHUNK_BYTES // chunk_sample_bytes)
