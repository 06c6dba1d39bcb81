"""O2U-Net hyperparameters as requested (`O2UConfig`) and as run (`ResolvedConfig`), and their ranges.

`O2UConfig` mirrors the proto's ScoringConfig plus a few engine-only knobs (numeric precision,
compilation, data placement). `None` or `"auto"` means "choose from the data and the device";
`resolve_config` (in `resolve`) makes every such choice explicit in a `ResolvedConfig`, which has
no optional fields, so the trainer never guards against an unmade choice and the resolved config
stored with a result is enough to reproduce it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from o2u_engine.errors import ConfigError

MODELS = ("auto", "mlp", "small_cnn", "cnn9", "resnet18", "resnet34", "resnet50")
PRECISIONS = ("auto", "fp32", "bf16")
PLACEMENTS = ("auto", "resident", "streamed")
# torch.compile modes; "reduce-overhead" replays each training step as a CUDA graph
# Augmentations for images: none; a random crop of the zero-padded image; crop + horizontal flip.
# A flip can change a class (text, digits, arrows: "b" <-> "d"), so it is used only when asked for.
AUGMENTATIONS = ("none", "crop", "crop_flip")
# The per-sample noise score: the paper's mean normalized cyclic-stage loss, the mean margin over
# the cyclic epochs (AUM: given-label logit minus the largest other logit) negated, or the mean of
# a sample's ranks by those two (`loss_margin`).
NOISE_SCORES = ("o2u_loss", "aum", "loss_margin")
SCORE_CHOICES = ("auto", *NOISE_SCORES)  # auto: aum for images, loss_margin for feature vectors
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")

MIN_IMAGE_SIZE = 8  # pixels


@dataclass(frozen=True)
class O2UConfig:
    """O2U-Net hyperparameters; `None`/`"auto"` fields are filled by `resolve_config`."""

    model: str = "auto"  # auto | mlp | small_cnn | cnn9 | resnet18 | resnet34 | resnet50
    seed: int = 0  # same seed, data and device -> same scores
    pretrain_epochs: int | None = None  # stage 1 length, epochs
    pretrain_learning_rate: float | None = None  # stage 1 SGD rate (fixed); auto: small_cnn 0.2, else 0.01
    cycle_length_epochs: int | None = None  # stage 2 cycle length c, epochs
    num_cycles: int | None = None  # stage 2 length = c * num_cycles epochs
    cycle_max_learning_rate: float | None = None  # r1, start of a cycle; auto: small_cnn 0.2, else 0.01
    cycle_min_learning_rate: float | None = None  # r2, end of a cycle; auto: small_cnn 0.02, else 0.001
    pretrain_batch_size: int | None = None  # samples per step in stages 1 and 3
    cyclic_batch_size: int | None = None  # samples per step in stage 2 (smaller than stage 1)
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # SGD L2 penalty coefficient
    # none | crop | crop_flip; None: auto (images under 16 px `crop`, larger ones and features
    # `none`). The legacy booleans mean True -> "crop" (never a flip), False -> "none".
    augment: str | bool | None = None
    # auto | aum | o2u_loss (the paper's) | loss_margin; auto: images aum, features loss_margin
    score: str = "auto"
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
    _check_float(config, "pretrain_learning_rate", 0.0, 10.0, low_open=True, optional=True)
    _check_int(config, "cycle_length_epochs", 1, 1_000, optional=True)
    _check_int(config, "num_cycles", 1, 1_000, optional=True)
    _check_float(config, "cycle_max_learning_rate", 0.0, 10.0, low_open=True, optional=True)
    _check_float(config, "cycle_min_learning_rate", 0.0, 10.0, low_open=True, optional=True)
    if (
        config.cycle_min_learning_rate is not None
        and config.cycle_max_learning_rate is not None
        and config.cycle_min_learning_rate > config.cycle_max_learning_rate
    ):
        raise ConfigError(
            f"cycle_min_learning_rate: expected a value <= cycle_max_learning_rate "
            f"({config.cycle_max_learning_rate}), got {config.cycle_min_learning_rate}",
            field="cycle_min_learning_rate",
        )
    _check_int(config, "pretrain_batch_size", 2, 65_536, optional=True)
    _check_int(config, "cyclic_batch_size", 2, 65_536, optional=True)
    _check_float(config, "momentum", 0.0, 1.0, high_open=True)
    _check_float(config, "weight_decay", 0.0, 1.0, high_open=True)
    if not isinstance(config.augment, bool) and config.augment is not None:
        _check_choice(config, "augment", AUGMENTATIONS)
    _check_choice(config, "score", SCORE_CHOICES)
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


@dataclass(frozen=True, kw_only=True)
class ResolvedConfig(O2UConfig):
    """An O2UConfig with every choice made: what `resolve_config` returns and a report records.

    Every value is also a valid O2UConfig value with the same meaning, so a resolved config is
    accepted wherever a config is and resolves to itself. Where O2UConfig writes "nothing" as
    None, this holds 0: `noise_rate` 0.0 (estimate it from the scores) and `image_size` 0 (feature
    vectors, which have no image side).
    """

    model: str  # mlp | small_cnn | cnn9 | resnet18 | resnet34 | resnet50
    seed: int
    pretrain_epochs: int
    pretrain_learning_rate: float
    cycle_length_epochs: int
    num_cycles: int
    cycle_max_learning_rate: float
    cycle_min_learning_rate: float
    pretrain_batch_size: int
    cyclic_batch_size: int
    momentum: float
    weight_decay: float
    augment: str  # none | crop | crop_flip
    score: str  # aum | o2u_loss | loss_margin
    noise_rate: float  # 0.0: estimated from the scores
    class_aware_normalization: bool
    clean_retraining: bool
    image_size: int  # 0 for feature vectors
    validation_fraction: float
    precision: str  # fp32 | bf16
    compile_model: bool
    compile_mode: str
    data_placement: str  # resident | streamed
    stream_chunk_samples: int

    def to_dict(self) -> dict[str, Any]:
        """The fields as results and checkpoint fingerprints store them: in O2UConfig's form, with
        None for an estimated noise rate and for the image size of feature vectors, so that
        `O2UConfig.from_dict` of it resolves to this config again."""
        values = dataclasses.asdict(self)
        values["noise_rate"] = self.noise_rate or None
        values["image_size"] = self.image_size or None
        return values
