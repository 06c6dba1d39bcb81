"""resolve_config: the auto rules, idempotence, and a ConfigError naming the field for bad values."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from o2u_engine import ConfigError, O2UConfig, ResolvedConfig, resolve_config


def resolve(config: O2UConfig = O2UConfig(), **data: Any) -> ResolvedConfig:  # noqa: B008 - frozen
    arguments: dict[str, Any] = {
        "num_samples": 3000,
        "sample_shape": (64, 64),
        "num_classes": 10,
        "device": "cpu",
    }
    arguments.update(data)
    return resolve_config(config, **arguments)


def test_features_get_an_mlp_without_augmentation() -> None:
    config = resolve(num_samples=1797, sample_shape=(64,))
    assert config.model == "mlp"
    assert config.augment == "none"
    assert config.score == "loss_margin"  # the mean rank by the paper's loss and by the margin
    assert (config.pretrain_learning_rate, config.cycle_max_learning_rate) == (0.01, 0.01)
    assert config.cycle_min_learning_rate == 0.001  # the paper's rates for models other than small_cnn
    assert config.image_size == 0  # feature vectors have no image side
    assert config.precision == "fp32"
    assert config.pretrain_batch_size == 112  # 1797 // 16
    assert config.cyclic_batch_size == 56
    assert config.pretrain_epochs == 18  # ceil(300 steps / 17 steps per epoch)
    assert (config.cycle_length_epochs, config.num_cycles) == (5, 3)


def test_cpu_images_get_a_small_cnn_at_32_px() -> None:
    config = resolve()
    assert config.model == "small_cnn"
    assert config.image_size == 32
    assert config.augment == "none"  # class-preserving; a flip only when asked for
    assert config.score == "aum"
    assert config.pretrain_batch_size == 128
    assert config.cyclic_batch_size == 64
    assert config.pretrain_epochs == 16  # small_cnn's stage 1
    assert (config.pretrain_learning_rate, config.cycle_max_learning_rate) == (0.2, 0.2)
    assert config.cycle_min_learning_rate == 0.02
    assert config.data_placement == "resident"


def test_small_images_keep_their_size_and_channels_layouts_are_read() -> None:
    assert resolve(sample_shape=(8, 8)).image_size == 8
    assert resolve(sample_shape=(3, 16, 16)).image_size == 16
    assert resolve(sample_shape=(16, 24, 3)).image_size == 24


def test_epoch_rule_adapts_to_dataset_size() -> None:
    large = resolve(num_samples=100_000, sample_shape=(32,))
    assert large.pretrain_epochs == 5  # 196 steps per epoch: the minimum of 5 epochs applies
    assert (large.cycle_length_epochs, large.num_cycles) == (10, 2)
    huge = resolve(num_samples=2_000_000, sample_shape=(32,))
    assert huge.pretrain_epochs == 2
    assert (huge.cycle_length_epochs, huge.num_cycles) == (5, 2)
    tiny = resolve(num_samples=40, sample_shape=(8,))
    assert tiny.pretrain_batch_size == 16
    assert tiny.pretrain_epochs == 40  # capped


def test_resolution_is_idempotent_and_keeps_explicit_values() -> None:
    explicit = O2UConfig(model="cnn9", pretrain_epochs=7, cyclic_batch_size=8, precision="fp32", seed=3)
    once = resolve(explicit)
    assert (once.model, once.pretrain_epochs, once.cyclic_batch_size, once.seed) == ("cnn9", 7, 8, 3)
    assert once.image_size == 32  # cnn9's minimum auto size
    assert resolve(once) == once
    assert resolve(resolve(O2UConfig(), sample_shape=(10,)), sample_shape=(10,)) == resolve(
        sample_shape=(10,)
    )


def test_zero_means_auto_for_noise_rate_and_image_size() -> None:
    for requested in (O2UConfig(noise_rate=0.0, image_size=0), O2UConfig(noise_rate=None, image_size=None)):
        config = resolve(requested)
        assert config.noise_rate == 0.0  # estimated from the scores
        assert config.image_size == 32


def test_clean_retraining_defaults_the_validation_fraction() -> None:
    assert resolve(O2UConfig(clean_retraining=True)).validation_fraction == 0.1
    assert resolve(O2UConfig(clean_retraining=True, validation_fraction=0.2)).validation_fraction == 0.2


def test_a_resolved_config_has_no_optional_field_and_is_a_config() -> None:
    for config in (resolve(), resolve(sample_shape=(10,))):
        assert isinstance(config, O2UConfig)
        assert all(getattr(config, field.name) is not None for field in dataclasses.fields(config))
        assert all("None" not in str(field.type) for field in dataclasses.fields(ResolvedConfig))


@pytest.mark.parametrize("sample_shape", [(64, 64), (10,)])
def test_config_round_trips_through_json(sample_shape: tuple[int, ...]) -> None:
    """The stored form is an O2UConfig that resolves to the same config; what it leaves to
    estimation, and the image size of feature vectors, read null as in the request."""
    config = resolve(sample_shape=sample_shape)
    stored = json.loads(config.to_json())
    assert stored["noise_rate"] is None
    assert (stored["image_size"] is None) == (sample_shape == (10,))
    assert resolve(O2UConfig.from_dict(stored), sample_shape=sample_shape) == config
    assert resolve(O2UConfig(noise_rate=0.2)).to_dict()["noise_rate"] == 0.2
    with pytest.raises(ConfigError, match="bogus: unknown configuration field"):
        O2UConfig.from_dict({"bogus": 1})


@pytest.mark.parametrize(
    ("changes", "field", "allowed"),
    [
        ({"model": "vgg"}, "model", "auto, mlp, small_cnn"),
        ({"seed": -1}, "seed", "[0, 9223372036854775807]"),
        ({"seed": True}, "seed", "integer"),
        ({"pretrain_epochs": -1}, "pretrain_epochs", "[0, 10000]"),
        ({"pretrain_learning_rate": 0.0}, "pretrain_learning_rate", "(0.0, 10.0]"),
        ({"pretrain_learning_rate": float("nan")}, "pretrain_learning_rate", "(0.0, 10.0]"),
        ({"cycle_length_epochs": 0}, "cycle_length_epochs", "[1, 1000]"),
        ({"num_cycles": 0}, "num_cycles", "[1, 1000]"),
        ({"cycle_max_learning_rate": 11.0}, "cycle_max_learning_rate", "(0.0, 10.0]"),
        (
            {"cycle_max_learning_rate": 0.01, "cycle_min_learning_rate": 0.05},
            "cycle_min_learning_rate",
            "<= cycle_max_learning_rate",
        ),
        ({"pretrain_batch_size": 1}, "pretrain_batch_size", "[2, 65536]"),
        ({"cyclic_batch_size": 10**6}, "cyclic_batch_size", "[2, 65536]"),
        ({"momentum": 1.0}, "momentum", "[0.0, 1.0)"),
        ({"weight_decay": -0.1}, "weight_decay", "[0.0, 1.0)"),
        ({"augment": "yes"}, "augment", "none, crop, crop_flip"),
        ({"augment": "flip"}, "augment", "none, crop, crop_flip"),
        ({"score": "loss"}, "score", "auto, o2u_loss, aum"),
        ({"noise_rate": 1.0}, "noise_rate", "[0.0, 1.0)"),
        ({"class_aware_normalization": 1}, "class_aware_normalization", "true or false"),
        ({"clean_retraining": None}, "clean_retraining", "true or false"),
        ({"image_size": 4}, "image_size", "[8, 1024]"),
        ({"validation_fraction": 0.5}, "validation_fraction", "[0.0, 0.5)"),
        ({"precision": "fp16"}, "precision", "auto, fp32, bf16"),
        ({"compile_model": "no"}, "compile_model", "true or false"),
        ({"compile_model": True, "compile_mode": "fast"}, "compile_mode", "default, reduce-overhead"),
        ({"compile_mode": "reduce-overhead"}, "compile_mode", "only with compile_model=True"),
        ({"data_placement": "disk"}, "data_placement", "auto, resident, streamed"),
        ({"stream_chunk_samples": 0}, "stream_chunk_samples", "[1, 2147483647]"),
    ],
)
def test_invalid_values_name_the_field_and_the_allowed_range(
    changes: dict[str, Any], field: str, allowed: str
) -> None:
    config = dataclasses.replace(O2UConfig(), **changes)
    with pytest.raises(ConfigError) as raised:
        resolve(config)
    assert raised.value.field == field
    assert str(raised.value).startswith(f"{field}: ")
    assert allowed in str(raised.value)


@pytest.mark.parametrize(
    ("config", "data", "field", "text"),
    [
        (O2UConfig(model="cnn9"), {"sample_shape": (16,)}, "model", "feature vectors need 'mlp'"),
        (O2UConfig(augment=True), {"sample_shape": (16,)}, "augment", "images only"),
        (O2UConfig(image_size=32), {"sample_shape": (16,)}, "image_size", "images only"),
        (O2UConfig(model="cnn9", image_size=16), {}, "image_size", "at least 28 px"),
        (O2UConfig(), {"num_classes": 1}, "num_classes", ">= 2"),
        (O2UConfig(), {"device": "tpu"}, "device", "'cpu'"),
    ],
)
def test_combinations_that_cannot_run(config: O2UConfig, data: dict[str, Any], field: str, text: str) -> None:
    with pytest.raises(ConfigError, match=text) as raised:
        resolve(config, **data)
    assert raised.value.field == field


def test_cuda_requested_without_cuda_is_a_config_error() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ConfigError, match="CUDA is not available") as raised:
        resolve(device="cuda")
    assert raised.value.field == "device"
