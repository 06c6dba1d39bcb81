"""The one table of dataset formats: every format has a row, a proto value and a client name, and the
table alone decides what a URI implies and whether it names a folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from o2u.v1 import scoring_pb2 as pb
from o2u_client import converters as client_converters
from o2u_client.cli import build_parser
from o2u_server.api import converters
from o2u_server.datasets import (
    FOLDER_FORMAT,
    FORMATS,
    check_dataset_exists,
    check_dataset_uri,
    infer_format,
)
from o2u_server.domain import DatasetFormat, ExportFormat, Job, JobState
from o2u_server.errors import InvalidArgument, NotFound
from o2u_server.storage import Storage
from tests.o2u_server.dataset_files import BUCKET, make_storage, png, solid
from tests.s3_server import S3Server


def _choices(command: str) -> list[str]:
    """The values the CLI's `command --format` accepts."""
    commands = next(action for action in build_parser()._actions if action.dest == "command")
    parser = commands.choices[command]  # type: ignore[index]
    option = next(action for action in parser._actions if "--format" in action.option_strings)
    return list(option.choices)


def test_every_format_has_a_row_a_proto_value_and_a_client_name() -> None:
    assert list(FORMATS) == list(DatasetFormat)
    proto_names = [value.name for value in pb.DatasetFormat.DESCRIPTOR.values if value.number]
    assert proto_names == [f"DATASET_FORMAT_{kind.name}" for kind in DatasetFormat]
    assert tuple(kind.value for kind in DatasetFormat) == client_converters.DATASET_FORMATS
    assert _choices("score") == [
        "npz",
        "image_folder",
        "csv_manifest",
        "jsonl_manifest",
        "parquet",
        "label_studio",
    ]
    assert tuple(kind.value for kind in ExportFormat) == client_converters.EXPORT_FORMATS
    assert _choices("export") == ["jsonl", "csv", "parquet", "label_studio"]


@pytest.mark.parametrize("kind", list(DatasetFormat))
def test_proto_values_map_both_ways(kind: DatasetFormat) -> None:
    value = client_converters.dataset_format(kind.value)
    assert converters.dataset_format(value) is kind
    request = pb.CreateScoringJobRequest(dataset=pb.DatasetRef(uri="file:///d/x", format=value))
    spec = converters.job_spec(request)
    job = Job(job_id="job-" + "0" * 32, spec=spec, state=JobState.QUEUED, create_time=0.0, update_time=0.0)
    assert converters.job_message(job).dataset.format == value


def test_unset_proto_values_mean_inferred_and_unknown_ones_are_invalid() -> None:
    assert converters.dataset_format(pb.DATASET_FORMAT_UNSPECIFIED) is None
    assert converters.export_format(pb.EXPORT_FORMAT_UNSPECIFIED) is None
    assert converters.job_state(pb.JOB_STATE_UNSPECIFIED) is None
    for convert, field in (
        (converters.dataset_format, "dataset.format"),
        (converters.export_format, "format"),
        (converters.job_state, "state"),
    ):
        with pytest.raises(InvalidArgument) as caught:
            convert(99)  # type: ignore[operator]
        assert (caught.value.reason, caught.value.field) == ("UNKNOWN_ENUM_VALUE", field)


def test_suffixes_in_the_table_decide_the_inferred_format() -> None:
    for kind, spec in FORMATS.items():
        for suffix in spec.suffixes:
            assert infer_format(f"s3://b/x/data{suffix.upper()}") is kind
            assert infer_format(f"file:///r/data{suffix}") is kind
    assert infer_format("s3://b/folder/") is FOLDER_FORMAT
    assert infer_format("file:///r/images") is FOLDER_FORMAT
    assert FORMATS[FOLDER_FORMAT].prefix


def test_only_folder_formats_take_a_whole_bucket(root: Path, s3: S3Server) -> None:
    storage = make_storage(root, s3)
    check_dataset_uri(f"s3://{BUCKET}", DatasetFormat.IMAGE_FOLDER, storage)
    with pytest.raises(InvalidArgument, match="no object key"):
        check_dataset_uri(f"s3://{BUCKET}", DatasetFormat.NPZ, storage)


def test_existence_is_a_stat_or_the_first_listing_entry(root: Path, s3: S3Server) -> None:
    storage: Storage = make_storage(root, s3)
    (root / "empty").mkdir()
    with pytest.raises(NotFound) as caught:
        check_dataset_exists(f"file://{root}/empty", None, storage)
    assert (caught.value.reason, caught.value.field) == ("DATASET_NOT_FOUND", "dataset.uri")
    (root / "folder" / "cat").mkdir(parents=True)
    (root / "folder" / "cat" / "0.png").write_bytes(png(solid((1, 2, 3), 0)))
    check_dataset_exists(f"file://{root}/folder", None, storage)
    with pytest.raises(NotFound) as caught:
        check_dataset_exists(f"file://{root}/folder/missing.npz", None, storage)
    assert caught.value.reason == "OBJECT_NOT_FOUND"
    with pytest.raises(InvalidArgument, match="not a regular file"):  # looked up as one object
        check_dataset_exists(f"file://{root}/folder", DatasetFormat.NPZ, storage)
