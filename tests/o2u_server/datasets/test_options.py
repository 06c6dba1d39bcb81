"""Dataset options checked at submit (`datasets.options`): every refusal is INVALID_ARGUMENT with its
reason and a BadRequest field violation naming the option by its request path, and the options that
can work are accepted without reading anything."""

from __future__ import annotations

import pytest
from google.rpc import code_pb2, error_details_pb2

from o2u_server.api.status import to_status
from o2u_server.datasets import check_dataset_options
from o2u_server.datasets.options import MAX_NAME_CHARS
from o2u_server.domain import DatasetFormat, DatasetOptions, LabelStudioOptions, ParquetOptions
from o2u_server.errors import InvalidArgument

PARQUET_URI = "s3://datasets/sets/table.parquet"
EXPORT_URI = "s3://datasets/ls/export.json"


def refusal(uri: str, dataset_format: DatasetFormat | None, options: DatasetOptions) -> tuple[str, str, str]:
    """(reason, field violation, message) of the status the refusal becomes, after checking its code."""
    with pytest.raises(InvalidArgument) as caught:
        check_dataset_options(uri, dataset_format, options)
    status = to_status(caught.value)
    assert status.code == code_pb2.INVALID_ARGUMENT
    info, request = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
    assert status.details[0].Unpack(info)
    assert status.details[1].Unpack(request)
    assert len(request.field_violations) == 1
    violation = request.field_violations[0]
    assert violation.field in status.message, "the message names the option too"
    return info.reason, violation.field, status.message


def parquet(**columns: str) -> DatasetOptions:
    return DatasetOptions(parquet=ParquetOptions(**columns))


def label_studio(annotation_rule: str = "", image_field: str = "") -> DatasetOptions:
    return DatasetOptions(label_studio=LabelStudioOptions(annotation_rule, image_field))


@pytest.mark.parametrize(
    ("uri", "dataset_format", "options", "field", "read_as"),
    [
        ("file:///d/x.npz", None, parquet(label_column="y"), "dataset.options.parquet", "npz"),
        (EXPORT_URI, None, parquet(), "dataset.options.parquet", "label_studio"),
        (PARQUET_URI, DatasetFormat.CSV_MANIFEST, parquet(), "dataset.options.parquet", "csv_manifest"),
        (PARQUET_URI, None, label_studio("majority"), "dataset.options.label_studio", "parquet"),
        ("s3://datasets/folder/", None, label_studio(), "dataset.options.label_studio", "image_folder"),
    ],
)
def test_options_of_another_format_are_refused(
    uri: str, dataset_format: DatasetFormat | None, options: DatasetOptions, field: str, read_as: str
) -> None:
    reason, violation, message = refusal(uri, dataset_format, options)
    assert (reason, violation) == ("OPTIONS_FORMAT_MISMATCH", field)
    assert f"this dataset is read as {read_as}" in message
    assert "set dataset.format, or leave these options out" in message


def test_an_embedding_column_and_an_image_key_column_are_refused_together() -> None:
    reason, field, message = refusal(
        PARQUET_URI, None, parquet(embedding_column="emb", image_key_column="path")
    )
    assert (reason, field) == ("INVALID_OPTION_COMBINATION", "dataset.options.parquet.image_key_column")
    assert "embedding_column cannot both be set" in message


@pytest.mark.parametrize(
    ("columns", "field", "said"),
    [
        ({"label_column": "id", "key_column": "id"}, "key_column", "'id' is also the label column"),
        ({"label_column": "emb", "embedding_column": "emb"}, "embedding_column", "'emb' is also the label"),
        ({"label_column": "features"}, "embedding_column", "'features' is also the label column"),
        (
            {"label_column": "path", "image_key_column": "path"},
            "image_key_column",
            "'path' is also the label",
        ),
        (
            {"key_column": "emb", "embedding_column": "emb"},
            "key_column",
            "'emb' is also the embedding column",
        ),
        ({"key_column": "features"}, "key_column", "'features' is also the embedding column"),
    ],
)
def test_one_column_named_for_two_roles_is_refused(columns: dict[str, str], field: str, said: str) -> None:
    reason, violation, message = refusal(PARQUET_URI, DatasetFormat.PARQUET, parquet(**columns))
    assert (reason, violation) == ("INVALID_OPTION_COMBINATION", f"dataset.options.parquet.{field}")
    assert said in message
    assert message.endswith("name a different column")


@pytest.mark.parametrize(
    "options",
    [
        parquet(image_key_column="key"),  # the keys are the image keys either way
        parquet(key_column="path", image_key_column="path"),
        parquet(label_column="y", key_column="id", embedding_column="emb"),
        parquet(label_column="cls", image_key_column="path"),
    ],
)
def test_parquet_options_that_can_work_are_accepted(options: DatasetOptions) -> None:
    check_dataset_options(PARQUET_URI, None, options)


@pytest.mark.parametrize(
    "options",
    [
        parquet(label_column="key"),
        parquet(embedding_column="key"),
        parquet(label_column="key", image_key_column="path"),
    ],
)
def test_the_default_key_column_gives_way_to_a_column_named_for_another_role(options: DatasetOptions) -> None:
    check_dataset_options(PARQUET_URI, None, options)  # the keys are then the row (or image) keys


@pytest.mark.parametrize(
    ("options", "field", "problem"),
    [
        (parquet(label_column="la\nbel"), "parquet.label_column", "control character U+000A at index 2"),
        (parquet(key_column="\x00"), "parquet.key_column", "control character U+0000 at index 0"),
        (parquet(embedding_column="e\u202emb"), "parquet.embedding_column", "U+202E at index 1"),
        (
            parquet(image_key_column="p" * 257),
            "parquet.image_key_column",
            "257 characters long, more than 256",
        ),
        (label_studio(image_field="img\x7f"), "label_studio.image_field", "control character U+007F"),
    ],
)
def test_bad_names_are_refused(options: DatasetOptions, field: str, problem: str) -> None:
    uri = EXPORT_URI if options.label_studio is not None else PARQUET_URI
    reason, violation, message = refusal(uri, None, options)
    assert (reason, violation) == ("INVALID_DATASET_OPTIONS", f"dataset.options.{field}")
    assert problem in message


def test_a_name_of_the_longest_length_is_accepted() -> None:
    check_dataset_options(PARQUET_URI, None, parquet(label_column="y" * MAX_NAME_CHARS))
    check_dataset_options(EXPORT_URI, None, label_studio(image_field="é" * MAX_NAME_CHARS))


def test_an_unknown_annotation_rule_is_refused() -> None:
    reason, field, message = refusal(EXPORT_URI, None, label_studio("consensus"))
    assert (reason, field) == ("INVALID_DATASET_OPTIONS", "dataset.options.label_studio.annotation_rule")
    assert "'consensus' is not one of latest, majority" in message


@pytest.mark.parametrize("rule", ["", "latest", "majority"])
def test_label_studio_options_that_can_work_are_accepted(rule: str) -> None:
    check_dataset_options(EXPORT_URI, None, label_studio(rule, "photo"))
    check_dataset_options("s3://datasets/ls/export", DatasetFormat.LABEL_STUDIO, label_studio(rule))


def test_no_options_and_empty_options_fit_every_format() -> None:
    for dataset_format in DatasetFormat:
        check_dataset_options(PARQUET_URI, dataset_format, None)
        check_dataset_options(PARQUET_URI, dataset_format, DatasetOptions())
