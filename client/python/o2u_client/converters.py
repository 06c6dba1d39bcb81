"""Request building: ScoringConfig messages from dicts or keyword arguments (or from a JSON
document, in protobuf's canonical JSON form or with the proto field names), and the protocol's
enum values from the plain names callers use (`"npz"`, `"csv"`, `"running"`), validated before any
call so a typo fails with the list of accepted names. The format names are the protocol's enum
value names, lower-cased and without their prefix (DATASET_FORMAT_IMAGE_FOLDER: `image_folder`),
the same names the server uses."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import EnumDescriptor

from o2u.v1 import scoring_pb2
from o2u_client.models import JobState

__all__ = [
    "ANNOTATION_RULES",
    "DATASET_FORMATS",
    "EXPORT_FORMATS",
    "LABEL_STUDIO_OPTIONS",
    "PARQUET_OPTIONS",
    "build_config",
    "build_dataset_options",
    "config_from_json",
    "dataset_format",
    "export_format",
    "job_state",
]


def _plain_names(enum: EnumDescriptor, prefix: str) -> tuple[str, ...]:
    """The enum's values as plain names, in protocol order, UNSPECIFIED (0) left out."""
    return tuple(value.name.removeprefix(prefix).lower() for value in enum.values if value.number != 0)


DATASET_FORMATS = _plain_names(scoring_pb2.DatasetFormat.DESCRIPTOR, "DATASET_FORMAT_")
EXPORT_FORMATS = _plain_names(scoring_pb2.ExportFormat.DESCRIPTOR, "EXPORT_FORMAT_")


def build_config(
    config: Mapping[str, Any] | scoring_pb2.ScoringConfig | None = None, **fields: Any
) -> scoring_pb2.ScoringConfig:
    """A ScoringConfig from a mapping and/or keyword fields; None values stay unset."""
    message = scoring_pb2.ScoringConfig()
    if isinstance(config, scoring_pb2.ScoringConfig):
        message.CopyFrom(config)
        config = None
    known = {f.name for f in scoring_pb2.ScoringConfig.DESCRIPTOR.fields}
    for name, value in {**(config or {}), **fields}.items():
        if name not in known:
            raise TypeError(f"unknown ScoringConfig field {name!r}; known fields: {', '.join(sorted(known))}")
        if value is not None:
            setattr(message, name, value)
    return message


def config_from_json(document: object) -> scoring_pb2.ScoringConfig:
    """A ScoringConfig from a parsed JSON object in protobuf's JSON form: field names as in the
    proto (`pretrain_epochs`) or lowerCamelCase (`pretrainEpochs`), int64 values as numbers or
    quoted strings (`"seed": "7"`), enums by name or number (`"AUGMENTATION_CROP"`); null leaves a
    field unset. ValueError naming the field for an unknown name or a value of the wrong type."""
    if not isinstance(document, Mapping):
        raise ValueError(
            f"a ScoringConfig must be a JSON object of its fields, not {type(document).__name__}"
        )
    fields = scoring_pb2.ScoringConfig.DESCRIPTOR.fields
    field_of = {f.name: f.name for f in fields} | {f.json_name: f.name for f in fields}
    given: dict[str, str] = {}
    for name in document:
        if name not in field_of:
            raise ValueError(
                f"unknown ScoringConfig field {name!r}; known fields: "
                f"{', '.join(f.name for f in fields)} (or their lowerCamelCase JSON names)"
            )
        earlier = given.setdefault(field_of[name], name)
        if earlier != name:
            raise ValueError(
                f"ScoringConfig field {field_of[name]} is given twice, as {earlier!r} and {name!r}"
            )
    try:
        return json_format.ParseDict(dict(document), scoring_pb2.ScoringConfig())
    except json_format.ParseError as exc:
        raise ValueError(f"invalid ScoringConfig: {exc}") from None


PARQUET_OPTIONS = tuple(f.name for f in scoring_pb2.ParquetOptions.DESCRIPTOR.fields)
LABEL_STUDIO_OPTIONS = tuple(f.name for f in scoring_pb2.LabelStudioOptions.DESCRIPTOR.fields)
ANNOTATION_RULES = _plain_names(scoring_pb2.AnnotationRule.DESCRIPTOR, "ANNOTATION_RULE_")


def build_dataset_options(
    options: Mapping[str, str | None] | scoring_pb2.DatasetOptions | None = None,
) -> scoring_pb2.DatasetOptions | None:
    """DatasetOptions from a mapping of ParquetOptions fields (`label_column`, `key_column`,
    `embedding_column`, `image_key_column`) or LabelStudioOptions fields (`annotation_rule`:
    `latest` or `majority`, `image_field`); None and "" values stay unset, and None when nothing is
    set. TypeError for an unknown name or a mix of the two formats' options."""
    if options is None or isinstance(options, scoring_pb2.DatasetOptions):
        return options
    given = {name: value for name, value in options.items() if value not in (None, "")}
    unknown = sorted(set(given) - set(PARQUET_OPTIONS) - set(LABEL_STUDIO_OPTIONS))
    if unknown:
        known = ", ".join(PARQUET_OPTIONS + LABEL_STUDIO_OPTIONS)
        raise TypeError(f"unknown dataset option(s) {', '.join(unknown)}; known options: {known}")
    parquet = {name: value for name, value in given.items() if name in PARQUET_OPTIONS}
    label_studio = {name: value for name, value in given.items() if name in LABEL_STUDIO_OPTIONS}
    if parquet and label_studio:
        raise TypeError(
            f"Parquet options ({', '.join(sorted(parquet))}) and Label Studio options "
            f"({', '.join(sorted(label_studio))}) cannot be combined: a dataset has one format"
        )
    if parquet:
        return scoring_pb2.DatasetOptions(parquet=scoring_pb2.ParquetOptions(**parquet))
    if label_studio:
        rule = label_studio.get("annotation_rule")
        message = scoring_pb2.LabelStudioOptions(image_field=label_studio.get("image_field") or "")
        if rule is not None:
            if str(rule).lower() not in ANNOTATION_RULES:
                raise ValueError(
                    f"unknown annotation_rule {rule!r}; expected one of {', '.join(ANNOTATION_RULES)}"
                )
            message.annotation_rule = scoring_pb2.AnnotationRule.Value(f"ANNOTATION_RULE_{str(rule).upper()}")
        return scoring_pb2.DatasetOptions(label_studio=message)
    return None


def _format_name(value: str | None, allowed: Collection[str]) -> str | None:
    """The upper-case enum suffix for a format name, None when unset; ValueError if unknown."""
    if not value:
        return None
    if value.lower() not in allowed:
        raise ValueError(f"unknown format {value!r}; expected one of {', '.join(sorted(allowed))}")
    return value.upper()


def dataset_format(value: str | None) -> scoring_pb2.DatasetFormat.ValueType:
    name = _format_name(value, DATASET_FORMATS)
    return (
        scoring_pb2.DatasetFormat.Value(f"DATASET_FORMAT_{name}")
        if name
        else scoring_pb2.DATASET_FORMAT_UNSPECIFIED
    )


def export_format(value: str | None) -> scoring_pb2.ExportFormat.ValueType:
    name = _format_name(value, EXPORT_FORMATS)
    return (
        scoring_pb2.ExportFormat.Value(f"EXPORT_FORMAT_{name}")
        if name
        else scoring_pb2.EXPORT_FORMAT_UNSPECIFIED
    )


def job_state(value: JobState | str | None) -> scoring_pb2.JobState.ValueType:
    if not value:
        return scoring_pb2.JOB_STATE_UNSPECIFIED
    try:
        state = JobState(str(value).upper())
    except ValueError:
        raise ValueError(f"unknown job state {value!r}; expected one of {', '.join(JobState)}") from None
    return scoring_pb2.JobState.Value(f"JOB_STATE_{state.value}")
