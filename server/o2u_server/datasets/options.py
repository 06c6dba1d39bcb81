"""Dataset options: how a dataset of one format is read (Parquet's column names and image keys, the
Label Studio annotation rule and image field), checked at submit against the format the dataset is
read as.

Everything that needs only the request is checked here, before the job exists: options of another
format, names that are empty where they must not be or hold control characters, and combinations
that cannot work (an embedding column together with an image-key column, one column named for two
roles; the default key column, being optional, gives way to a column named for another role).
Whether a named column is in the file is known only once the file is read: the loader then fails
the job with INVALID_ARGUMENT naming the option (`missing_column`). Each error names the
option by its request path, e.g. `dataset.options.parquet.label_column`.
"""

from __future__ import annotations

from o2u_server.domain import ANNOTATION_RULES, DatasetFormat, DatasetOptions, ParquetOptions
from o2u_server.errors import InvalidArgument
from o2u_server.text import shown, text_problem

__all__ = [
    "DEFAULT_EMBEDDING_COLUMN",
    "DEFAULT_IMAGE_FIELD",
    "DEFAULT_KEY_COLUMN",
    "DEFAULT_LABEL_COLUMN",
    "MAX_NAME_CHARS",
    "check_dataset_options",
    "missing_column",
]

DEFAULT_LABEL_COLUMN = "label"
DEFAULT_KEY_COLUMN = "key"
DEFAULT_EMBEDDING_COLUMN = "features"
DEFAULT_IMAGE_FIELD = "image"
MAX_NAME_CHARS = 256  # a column or field name, in characters
_PARQUET = "dataset.options.parquet"
_LABEL_STUDIO = "dataset.options.label_studio"


def _invalid(field: str, message: str, reason: str = "INVALID_DATASET_OPTIONS") -> InvalidArgument:
    return InvalidArgument(f"{field} {message}", reason=reason, field=field)


def _check_name(field: str, value: str) -> None:
    problem = text_problem(value, max_chars=MAX_NAME_CHARS)
    if problem is not None:
        raise _invalid(field, problem)


def _check_parquet(options: ParquetOptions) -> None:
    named = {
        "label_column": options.label_column,
        "key_column": options.key_column,
        "embedding_column": options.embedding_column,
        "image_key_column": options.image_key_column,
    }
    for name, value in named.items():
        _check_name(f"{_PARQUET}.{name}", value)
    if options.image_key_column and options.embedding_column:
        raise _invalid(
            f"{_PARQUET}.image_key_column",
            "and embedding_column cannot both be set: the samples are either images or embeddings",
            reason="INVALID_OPTION_COMBINATION",
        )
    label = options.label_column or DEFAULT_LABEL_COLUMN
    samples = "embedding_column" if not options.image_key_column else "image_key_column"
    others = {
        samples: options.image_key_column or options.embedding_column or DEFAULT_EMBEDDING_COLUMN,
    }
    if options.key_column:  # the default key column gives way to a column named for another role
        others["key_column"] = options.key_column
    for name, value in others.items():
        if value == label:
            raise _invalid(
                f"{_PARQUET}.{name}",
                f"{shown(value, 80)!r} is also the label column; name a different column",
                reason="INVALID_OPTION_COMBINATION",
            )
    if samples == "embedding_column" and others.get("key_column") == others["embedding_column"]:
        raise _invalid(
            f"{_PARQUET}.key_column",
            f"{shown(options.key_column, 80)!r} is also the embedding column; name a different column",
            reason="INVALID_OPTION_COMBINATION",
        )


def check_dataset_options(options: DatasetOptions | None, dataset_format: DatasetFormat) -> None:
    """InvalidArgument naming the option when `options` cannot apply to a dataset read as
    `dataset_format` (the format given, or inferred from the URI)."""
    if options is None:
        return
    if options.parquet is not None:
        if dataset_format is not DatasetFormat.PARQUET:
            raise _invalid(
                _PARQUET,
                f"applies only to Parquet datasets; this dataset is read as {dataset_format.value} "
                "(set dataset.format, or leave these options out)",
                reason="OPTIONS_FORMAT_MISMATCH",
            )
        _check_parquet(options.parquet)
    if options.label_studio is not None:
        if dataset_format is not DatasetFormat.LABEL_STUDIO:
            raise _invalid(
                _LABEL_STUDIO,
                f"applies only to Label Studio exports; this dataset is read as {dataset_format.value} "
                "(set dataset.format, or leave these options out)",
                reason="OPTIONS_FORMAT_MISMATCH",
            )
        rule = options.label_studio.annotation_rule
        if rule and rule not in ANNOTATION_RULES:
            raise _invalid(
                f"{_LABEL_STUDIO}.annotation_rule",
                f"{shown(rule, 40)!r} is not one of {', '.join(ANNOTATION_RULES)}",
            )
        _check_name(f"{_LABEL_STUDIO}.image_field", options.label_studio.image_field)


def missing_column(option: str, column: str, where: str, present: list[str]) -> InvalidArgument:
    """The error of a column named by `option` (e.g. `label_column`) that the file lacks."""
    field = f"{_PARQUET}.{option}"
    return InvalidArgument(
        f"{field} {shown(column, 80)!r} is not a column of {where}; it holds "
        f"{shown(', '.join(present), 400) or 'no columns'}",
        reason="UNKNOWN_COLUMN",
        field=field,
    )
