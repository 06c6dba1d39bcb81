"""The networks O2U-Net can train, built by name, and loading of initial weights.

- `mlp`: a two-hidden-layer perceptron for `(N, D)` feature vectors (embedding mode); images
  are flattened.
- `small_cnn`: three conv-BN-ReLU blocks, cheap enough to train on a CPU.
- `cnn9`: the 9-layer CNN of the Co-teaching paper (128-256-512 channels, BatchNorm, LeakyReLU
  0.01), the small model of the O2U-Net paper. Its dropout layers are left out: stage 2's
  cyclic learning rate already supplies the ensemble, and dropout would tie reproducibility to
  the process-wide random generator.
- `resnet18/34/50`: torchvision ResNets with the stem adapted to small images (3x3 stride-1
  convolution, no max-pool), for any number of input channels.
"""

from __future__ import annotations

import itertools
import os
import pickle
import warnings

import torch
from torch import nn

from o2u_engine.errors import ConfigError
from o2u_engine.layout import SampleLayout

MLP_HIDDEN = 256  # units per hidden layer; ample for 10-1000 classes on frozen embeddings
SMALL_CNN_WIDTH = 32  # channels of the first block, doubled per block


def _mlp(in_features: int, num_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, MLP_HIDDEN),
        nn.ReLU(inplace=True),
        nn.Linear(MLP_HIDDEN, MLP_HIDDEN),
        nn.ReLU(inplace=True),
        nn.Linear(MLP_HIDDEN, num_classes),
    )


def _conv_bn(
    in_channels: int, out_channels: int, *, padding: int = 1, slope: float | None = None
) -> list[nn.Module]:
    activation: nn.Module = nn.ReLU(inplace=True) if slope is None else nn.LeakyReLU(slope, inplace=True)
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=padding, bias=False)
    return [conv, nn.BatchNorm2d(out_channels), activation]


def _small_cnn(in_channels: int, num_classes: int) -> nn.Module:
    width = SMALL_CNN_WIDTH
    return nn.Sequential(
        *_conv_bn(in_channels, width),  # (B, w, S, S)
        nn.MaxPool2d(2),  # (B, w, S/2, S/2)
        *_conv_bn(width, 2 * width),
        nn.MaxPool2d(2),  # (B, 2w, S/4, S/4)
        *_conv_bn(2 * width, 4 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),  # (B, 4w)
        nn.Linear(4 * width, num_classes),
    )


def _cnn9(in_channels: int, num_classes: int) -> nn.Module:
    def block(channels: list[int], padding: int) -> list[nn.Module]:
        layers: list[nn.Module] = []
        for c_in, c_out in itertools.pairwise(channels):
            layers += _conv_bn(c_in, c_out, padding=padding, slope=0.01)
        return layers

    return nn.Sequential(
        *block([in_channels, 128, 128, 128], padding=1),  # (B, 128, S, S)
        nn.MaxPool2d(2),  # (B, 128, S/2, S/2)
        *block([128, 256, 256, 256], padding=1),
        nn.MaxPool2d(2),  # (B, 256, S/4, S/4)
        *block([256, 512, 256, 128], padding=0),  # (B, 128, S/4 - 6, S/4 - 6)
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),  # (B, 128)
        nn.Linear(128, num_classes),
    )


def _resnet(name: str, in_channels: int, num_classes: int) -> nn.Module:
    # Imported here: torchvision's package import pulls in torch._dynamo (about 2 s), which every
    # server start and every spawned training process would pay for networks it does not build.
    import torchvision

    network: nn.Module = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    # The ImageNet stem (7x7 stride 2 + max-pool) would shrink a 32 px image to 8 px before the
    # first block; the CIFAR-style stem keeps the resolution.
    network.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    network.maxpool = nn.Identity()
    return network


def build_model(
    name: str,
    *,
    in_channels: int,
    num_classes: int,
    image_size: int | None = None,
    feature_dim: int | None = None,
) -> nn.Module:
    """A freshly initialized network; images need `image_size`, `mlp` needs `feature_dim`."""
    if name == "mlp":
        if feature_dim is None:
            if image_size is None:
                raise ConfigError("model: mlp needs feature_dim or image_size", field="model")
            feature_dim = in_channels * image_size * image_size
        return _mlp(feature_dim, num_classes)
    if name == "small_cnn":
        return _small_cnn(in_channels, num_classes)
    if name == "cnn9":
        return _cnn9(in_channels, num_classes)
    if name in ("resnet18", "resnet34", "resnet50"):
        return _resnet(name, in_channels, num_classes)
    raise ConfigError(
        f"model: expected mlp, small_cnn, cnn9, resnet18, resnet34 or resnet50, got {name!r}", field="model"
    )


def is_convolutional(name: str) -> bool:
    return name != "mlp"


def load_initial_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict of tensors with `torch.load(weights_only=True)`; pickled code is refused.

    A `{"state_dict": {...}}` or `{"model": {...}}` wrapper, as written by common training
    scripts, is unwrapped.
    """
    try:
        with warnings.catch_warnings():  # the restricted unpickler still refuses what it must
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            loaded = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise ConfigError(
            f"initial_weights: file not found: {os.fspath(path)}", field="initial_weights"
        ) from error
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(
            "initial_weights: not a plain PyTorch state dict of tensors (loaded with weights_only=True, "
            f"which refuses pickled objects): {first_line}",
            field="initial_weights",
        ) from error
    if isinstance(loaded, dict):
        for key in ("state_dict", "model"):
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in loaded.items()
    ):
        raise ConfigError(
            "initial_weights: expected a state dict mapping parameter names to tensors",
            field="initial_weights",
        )
    return loaded


def apply_initial_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], model_name: str) -> None:
    """Load `state_dict` into `model`, strictly; a mismatch is a ConfigError listing what differs."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(
        key for key in set(expected) & set(state_dict) if expected[key].shape != state_dict[key].shape
    )
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if keys:
                shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
                parts.append(f"{label}: {shown}")
        raise ConfigError(
            f"initial_weights: does not fit the {model_name} model for this dataset ({'; '.join(parts)})",
            field="initial_weights",
        )
    model.load_state_dict(state_dict, strict=True)


def initialized_model(
    name: str,
    *,
    layout: SampleLayout,
    num_classes: int,
    image_size: int | None,
    seed: int,
    initial_state: dict[str, torch.Tensor] | None,
    device: torch.device,
) -> nn.Module:
    """The network a phase starts from: seeded initialization (the same on every device, and
    without touching the caller's global generator) or the initial weights, on `device`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(
            name,
            in_channels=layout.channels,
            num_classes=num_classes,
            image_size=image_size,
            feature_dim=None if layout.is_images else layout.feature_dim,
        )
    if initial_state is not None:
        apply_initial_weights(model, initial_state, name)
    model = model.to(device)
    if device.type == "cuda" and is_convolutional(name):
        model = model.to(memory_format=torch.channels_last)  # the layout tensor cores prefer
    return model
