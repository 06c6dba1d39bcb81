"""Option tables of the `o2u` CLI: the connection options every subcommand accepts, and for
`o2u score` one flag per DatasetOptions field (how the dataset is read) and per ScoringConfig field.

Connection options are added to the top-level parser and to every subcommand with
`argparse.SUPPRESS` defaults, so `o2u --json jobs` and `o2u jobs --json` both work; the real
defaults (including the O2U_TARGET and O2U_TOKEN_FILE environment variables) are filled in by
`global_defaults` after parsing.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CONFIG_OPTIONS",
    "DATASET_OPTIONS",
    "ConfigOption",
    "add_config_options",
    "add_dataset_options",
    "add_global_options",
    "dataset_options",
    "global_defaults",
]

DEFAULT_TARGET = "localhost:50051"
# Seconds: longer than a rolling restart or a rescheduled pod takes, short enough that a server
# gone for good ends the watch.
DEFAULT_RECONNECT_WINDOW = 120.0


def add_global_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection and output")
    hidden = argparse.SUPPRESS
    group.add_argument(
        "--target",
        default=hidden,
        help="server host:port, or dns:///host:port to balance over every replica the name resolves "
        f"to (env O2U_TARGET, default {DEFAULT_TARGET})",
    )
    group.add_argument("--tls", action="store_true", default=hidden, help="connect with TLS")
    group.add_argument(
        "--ca-cert", default=hidden, metavar="PEM", help="CA bundle to verify the server (implies --tls)"
    )
    group.add_argument(
        "--client-cert", default=hidden, metavar="PEM", help="client certificate for mutual TLS"
    )
    group.add_argument("--client-key", default=hidden, metavar="PEM", help="private key of --client-cert")
    group.add_argument(
        "--server-name",
        default=hidden,
        help="expected TLS server name, if not the target's host (needs --tls or --ca-cert)",
    )
    group.add_argument(
        "--token-file",
        default=hidden,
        metavar="FILE",
        help="file holding the bearer token (env O2U_TOKEN_FILE)",
    )
    group.add_argument(
        "--allow-plaintext-token",
        action="store_true",
        default=hidden,
        help="send the token without TLS to a non-loopback target (a network that already encrypts)",
    )
    group.add_argument(
        "--timeout", type=float, default=hidden, metavar="SECONDS", help="per-call timeout (default 30)"
    )
    group.add_argument(
        "--reconnect-window",
        type=float,
        default=hidden,
        metavar="SECONDS",
        help="how long a watch (watch, score) keeps reconnecting to a server it had reached, from the "
        f"loss on, e.g. through a restart (default {DEFAULT_RECONNECT_WINDOW:g})",
    )
    group.add_argument("--json", action="store_true", default=hidden, help="machine-readable JSON output")


def global_defaults(args: argparse.Namespace) -> None:
    defaults: dict[str, Any] = {
        "target": os.environ.get("O2U_TARGET") or DEFAULT_TARGET,
        "tls": False,
        "ca_cert": None,
        "client_cert": None,
        "client_key": None,
        "server_name": None,
        "token_file": os.environ.get("O2U_TOKEN_FILE") or None,
        "allow_plaintext_token": False,
        "timeout": 30.0,
        "reconnect_window": DEFAULT_RECONNECT_WINDOW,
        "json": False,
    }
    for name, value in defaults.items():
        if not hasattr(args, name):
            setattr(args, name, value)


@dataclass(frozen=True)
class ConfigOption:
    field: str  # ScoringConfig field name
    kind: type
    help: str
    metavar: str | None = None
    choices: tuple[str, ...] = ()  # an enum field: the lower-case names after `enum_prefix`
    enum_prefix: str = ""  # e.g. "AUGMENTATION_": a choice c is sent as enum_prefix + c.upper()
    flag_name: str = ""  # the flag without "--" when it is not the field's name

    @property
    def flag(self) -> str:
        return "--" + (self.flag_name or self.field.replace("_", "-"))

    def value(self, given: Any) -> Any:
        """What the ScoringConfig field is set to for the parsed flag value `given`."""
        return self.enum_prefix + given.upper() if self.enum_prefix else given


CONFIG_OPTIONS = (
    ConfigOption("model", str, "auto (default), mlp, small_cnn, cnn9, resnet18, resnet34 or resnet50"),
    ConfigOption("seed", int, "random seed; same seed and device give the same scores"),
    ConfigOption("pretrain_epochs", int, "stage 1 length, in epochs", "EPOCHS"),
    ConfigOption("pretrain_learning_rate", float, "stage 1 learning rate", "LR"),
    ConfigOption("cycle_length_epochs", int, "stage 2 cycle length c, in epochs", "EPOCHS"),
    ConfigOption("num_cycles", int, "learning-rate cycles in stage 2", "N"),
    ConfigOption(
        "cycle_max_learning_rate", float, "stage 2 learning rate at the start of a cycle (r1)", "LR"
    ),
    ConfigOption("cycle_min_learning_rate", float, "stage 2 learning rate at the end of a cycle (r2)", "LR"),
    ConfigOption("pretrain_batch_size", int, "stage 1 batch size, in samples", "N"),
    ConfigOption("cyclic_batch_size", int, "stage 2 batch size, in samples", "N"),
    ConfigOption("momentum", float, "SGD momentum"),
    ConfigOption("weight_decay", float, "SGD weight decay"),
    ConfigOption(
        "augmentation",
        str,
        "image augmentation: none, crop, or crop_flip (only for mirror-invariant classes: a flip "
        "changes text, digits and arrows); default: none from 16 px, a crop for smaller images",
        choices=("none", "crop", "crop_flip"),
        enum_prefix="AUGMENTATION_",
        flag_name="augment",
    ),
    ConfigOption(
        "score",
        str,
        "noise score: aum (mean margin over the cyclic stage; images' default), o2u_loss (the paper's "
        "mean loss) or loss_margin (the mean of the two ranks; features' default)",
        choices=("aum", "o2u_loss", "loss_margin"),
        enum_prefix="NOISE_SCORE_KIND_",
    ),
    ConfigOption("noise_rate", float, "known fraction of wrong labels in [0, 1); default: estimated", "RATE"),
    ConfigOption("class_aware_normalization", bool, "normalize losses within each class"),
    ConfigOption("clean_retraining", bool, "run stage 3 and report accuracy with and without cleaning"),
    ConfigOption("image_size", int, "side length images are resized to, in pixels", "PIXELS"),
    ConfigOption(
        "validation_fraction", float, "held-out fraction for stage 3 accuracy, in [0, 0.5)", "FRACTION"
    ),
    ConfigOption(
        "initial_weights_uri", str, "initial model weights (PyTorch state dict), s3:// or file://", "URI"
    ),
)


def add_config_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("scoring configuration (unset options take the server's default)")
    for option in CONFIG_OPTIONS:
        if option.choices:
            group.add_argument(
                option.flag, dest=option.field, choices=option.choices, default=None, help=option.help
            )
        elif option.kind is bool:
            group.add_argument(
                option.flag, action=argparse.BooleanOptionalAction, default=None, help=option.help
            )
        else:
            group.add_argument(
                option.flag, type=option.kind, default=None, metavar=option.metavar, help=option.help
            )


# DatasetOptions fields as (field, help); a flag is the field with dashes.
DATASET_OPTIONS = (
    ("label_column", "Parquet: the column of labels (default label)"),
    ("key_column", "Parquet: the column of sample keys (default key, else row numbers or image keys)"),
    ("embedding_column", "Parquet: the column of embeddings (default features)"),
    (
        "image_key_column",
        "Parquet: a column of image object keys relative to the file's folder, instead of embeddings",
    ),
    ("annotation_rule", "Label Studio: which annotation of a task counts, latest (default) or majority"),
    ("image_field", "Label Studio: the task data field naming the image (default image)"),
)


def add_dataset_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("dataset options (unset options take the format's default)")
    for name, help_text in DATASET_OPTIONS:
        flag = "--" + name.replace("_", "-")
        if name == "annotation_rule":
            group.add_argument(flag, choices=("latest", "majority"), default=None, help=help_text)
        else:
            group.add_argument(flag, default=None, metavar="NAME", help=help_text)


def dataset_options(args: argparse.Namespace) -> dict[str, str | None]:
    """The dataset option flags as given (None: unset), by DatasetOptions field name."""
    return {name: getattr(args, name) for name, _ in DATASET_OPTIONS}
