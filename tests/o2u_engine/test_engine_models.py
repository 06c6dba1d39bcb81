"""Model construction for every name, and loading initial weights safely."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from o2u_engine import ConfigError, build_model
from o2u_engine.models import apply_initial_weights, load_initial_weights


@pytest.mark.parametrize(
    ("name", "channels", "size"),
    [
        ("small_cnn", 1, 8),
        ("small_cnn", 4, 20),
        ("cnn9", 3, 28),
        ("cnn9", 1, 32),
        ("resnet18", 2, 8),
        ("mlp", 3, 6),
    ],
)
def test_models_map_images_to_logits(name: str, channels: int, size: int) -> None:
    model = build_model(name, in_channels=channels, num_classes=5, image_size=size)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, channels, size, size)).shape == (2, 5)


@pytest.mark.parametrize("name", ["resnet34", "resnet50"])
def test_deeper_resnets(name: str) -> None:
    model = build_model(name, in_channels=3, num_classes=7, image_size=16)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 16, 16)).shape == (1, 7)


def test_resnet_stem_is_adapted_to_small_images() -> None:
    model = build_model("resnet18", in_channels=1, num_classes=3, image_size=32)
    stem = model.get_submodule("conv1")
    assert isinstance(stem, torch.nn.Conv2d)
    assert stem.kernel_size == (3, 3)
    assert stem.stride == (1, 1)
    assert isinstance(model.get_submodule("maxpool"), torch.nn.Identity)


def test_cnn9_follows_co_teaching() -> None:
    model = build_model("cnn9", in_channels=3, num_classes=10, image_size=32)
    convolutions = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convolutions] == [128, 128, 128, 256, 256, 256, 512, 256, 128]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 9
    assert {m.negative_slope for m in model.modules() if isinstance(m, torch.nn.LeakyReLU)} == {0.01}


def test_features_mlp_and_unknown_names() -> None:
    assert build_model("mlp", in_channels=0, num_classes=3, feature_dim=10)(torch.randn(4, 10)).shape == (
        4,
        3,
    )
    with pytest.raises(ConfigError, match="model: expected"):
        build_model("vgg", in_channels=1, num_classes=3)


def test_initial_weights_round_trip(tmp_path: Path) -> None:
    source = build_model("mlp", in_channels=0, num_classes=3, feature_dim=4)
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": source.state_dict()}, path)
    target = build_model("mlp", in_channels=0, num_classes=3, feature_dim=4)
    apply_initial_weights(target, load_initial_weights(path), "mlp")
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)


class Payload:
    """Stands in for an object a malicious weights file would unpickle (and run code from)."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("this must never run",))


def test_a_pickled_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    with path.open("wb") as stream:
        pickle.dump({"weight": Payload()}, stream)
    with pytest.raises(ConfigError, match="weights_only=True") as raised:
        load_initial_weights(path)
    assert raised.value.field == "initial_weights"


def test_weights_that_do_not_fit_are_explained(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save(build_model("mlp", in_channels=0, num_classes=5, feature_dim=4).state_dict(), path)
    target = build_model("mlp", in_channels=0, num_classes=3, feature_dim=4)
    with pytest.raises(ConfigError, match=r"wrong shape: 5\.bias, 5\.weight"):
        apply_initial_weights(target, load_initial_weights(path), "mlp")
    with pytest.raises(ConfigError, match="file not found"):
        load_initial_weights(tmp_path / "missing.pt")
    (tmp_path / "list.pt").write_bytes(b"")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ConfigError, match="expected a state dict"):
        load_initial_weights(tmp_path / "list.pt")
