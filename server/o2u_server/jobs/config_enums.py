"""The ScoringConfig enum fields (`augmentation`, `score`) in the engine's terms.

A request's config is stored as the proto fields the caller set, enum fields as their numbers;
`engine_fields` turns those into the engine's O2UConfig keyword arguments: `augmentation` becomes
`augment` ("none", "crop" or "crop_flip") and `score` stays `score` ("o2u_loss", "aum" or
"loss_margin"). The
legacy boolean `augment` keeps working (true is a crop, never a flip); set together with an
`augmentation` that means something else, or with an enum number this server does not know, the
request is INVALID_ARGUMENT naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from o2u_server.errors import InvalidArgument

AUGMENTATIONS = {1: "none", 2: "crop", 3: "crop_flip"}  # Augmentation number -> engine value
NOISE_SCORES = {1: "o2u_loss", 2: "aum", 3: "loss_margin"}  # NoiseScoreKind number -> engine value
LEGACY_AUGMENT = {True: "crop", False: "none"}  # the boolean `augment` field


def _known(value: Any, known: dict[int, str], enum_name: str, field: str) -> str:
    if value not in known:
        numbers = ", ".join(str(number) for number in sorted(known))
        raise InvalidArgument(
            f"{field} {value} is not a {enum_name} this server knows (0 or one of {numbers})",
            reason="INVALID_CONFIG",
            field=field,
        )
    return known[value]


def engine_fields(requested: Mapping[str, Any]) -> dict[str, Any]:
    """The O2UConfig keyword arguments for the stored ScoringConfig fields `requested`."""
    fields = dict(requested)
    augmentation = fields.pop("augmentation", 0)
    score = fields.pop("score", 0)
    if augmentation:
        chosen = _known(augmentation, AUGMENTATIONS, "Augmentation", "config.augmentation")
        legacy = fields.get("augment")
        if isinstance(legacy, bool) and LEGACY_AUGMENT[legacy] != chosen:
            raise InvalidArgument(
                f"config.augment {str(legacy).lower()} (which means {LEGACY_AUGMENT[legacy]}) conflicts "
                f"with config.augmentation {chosen}; set only augmentation",
                reason="INVALID_CONFIG",
                field="config.augmentation",
            )
        fields["augment"] = chosen
    if score:
        fields["score"] = _known(score, NOISE_SCORES, "NoiseScoreKind", "config.score")
    return fields
