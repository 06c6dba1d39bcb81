"""write_export (JSONL, CSV, Parquet, Label Studio tasks) to real files and a real S3 server, and
the format a destination implies."""

from __future__ import annotations

import csv
import io
import json
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from o2u_server.datasets import parquet_export
from o2u_server.datasets.exports import EXPORT_COLUMNS, infer_export_format, write_export
from o2u_server.domain import DatasetFormat, ExportFormat, Job, JobSpec, JobState, NoiseScoreRow
from o2u_server.errors import AlreadyExists, InvalidArgument, NotFound, PermissionDenied, ResourceExhausted
from o2u_server.settings import Settings
from o2u_server.storage import Storage, objectstore
from tests.o2u_server.dataset_files import BUCKET, Store, make_storage
from tests.o2u_server.jobs.full_volumes import mounted_tmpfs
from tests.s3_server import S3Server


@pytest.fixture
def storage(root: Path, s3: S3Server) -> Storage:
    return make_storage(root, s3)


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, root: Path, s3: S3Server) -> Store:
    return Store(root, s3, request.param)


ROWS: list[dict[str, object]] = [
    {"sample_id": 0, "key": "cat/0.png", "score": 1.5, "rank": np.int64(1), "suspected": True},
    {"sample_id": 1, "key": 'dog/"1",.png', "score": np.float64(-0.25), "rank": 2, "suspected": False},
]


def test_exports_round_trip(store: Store, s3: S3Server, root: Path) -> None:
    storage = store.storage
    jsonl_uri = store.uri("exports/run-1/scores.jsonl")
    assert write_export(iter(ROWS), jsonl_uri, ExportFormat.JSONL, storage)[0] == 2
    csv_uri = store.uri("exports/run-1/scores.csv")
    rows, size = write_export(ROWS, csv_uri, ExportFormat.CSV, storage)
    assert rows == 2
    jsonl_text = storage.read_bytes(jsonl_uri).decode()
    assert [json.loads(line) for line in jsonl_text.splitlines()] == [
        {"sample_id": 0, "key": "cat/0.png", "score": 1.5, "rank": 1, "suspected": True},
        {"sample_id": 1, "key": 'dog/"1",.png', "score": -0.25, "rank": 2, "suspected": False},
    ]
    csv_bytes = storage.read_bytes(csv_uri)
    assert len(csv_bytes) == size
    parsed = list(csv.DictReader(io.StringIO(csv_bytes.decode())))
    assert parsed[1] == {
        "sample_id": "1",
        "key": 'dog/"1",.png',
        "score": "-0.25",
        "rank": "2",
        "suspected": "false",
    }


def test_export_outside_the_export_locations_is_denied(storage: Storage, root: Path) -> None:
    for uri in (
        f"file://{root.parent}/scores.csv",
        f"file://{root}/scores.csv",  # a data root, but not an export location
        "s3://not-allowed/scores.csv",
        "s3://datasets/scores.csv",  # an allowed bucket, outside the export prefix
    ):
        with pytest.raises(PermissionDenied) as caught:
            write_export(ROWS, uri, ExportFormat.CSV, storage)
        assert caught.value.reason == "EXPORT_NOT_ALLOWED", uri
    assert not (root.parent / "scores.csv").exists()
    assert not (root / "scores.csv").exists()


def test_an_export_never_replaces_a_file_or_object(store: Store) -> None:
    uri = store.put("exports/keep.csv", b"someone's file")
    with pytest.raises(AlreadyExists):
        write_export(ROWS, uri, ExportFormat.CSV, store.storage)
    assert store.storage.read_bytes(uri) == b"someone's file"


def test_destination_implies_the_format() -> None:
    assert infer_export_format("s3://b/run/scores.JSONL") is ExportFormat.JSONL
    assert infer_export_format("file:///r/scores.ndjson") is ExportFormat.JSONL
    assert infer_export_format("file:///r/scores.csv") is ExportFormat.CSV
    assert infer_export_format("file:///r/scores.parquet") is ExportFormat.PARQUET
    with pytest.raises(InvalidArgument) as caught:
        infer_export_format("file:///r/scores.xlsx")
    assert (caught.value.reason, caught.value.field) == ("INVALID_FORMAT", "format")


def test_export_columns_are_score_fields() -> None:
    assert set(EXPORT_COLUMNS) <= set(NoiseScoreRow.__dataclass_fields__)


@pytest.mark.parametrize("export_format", [ExportFormat.JSONL, ExportFormat.CSV])
def test_a_file_export_is_written_as_the_rows_come(
    storage: Storage, root: Path, export_format: ExportFormat
) -> None:
    """A file:// export is encoded into the file as the rows come, holding next to nothing in
    memory: a text buffer and its encoded copy held it two to three times over (an export runs on
    an RPC thread, several at once)."""
    rows = (
        {
            "rank": i,
            "key": f"images/é-{i % 10}/{i:08d}.png",
            "score": 0.123456789 * i,
            "suspected": i % 3 == 0,
        }
        for i in range(50_000)
    )
    uri = f"file://{root}/exports/memory.{export_format.name.lower()}"
    tracemalloc.start()
    try:
        _, size = write_export(rows, uri, export_format, storage)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert size > 2_000_000
    assert peak < size / 10
    assert (root / "exports" / f"memory.{export_format.name.lower()}").stat().st_size == size


def test_a_file_export_that_does_not_fit_leaves_nothing_behind(tmp_path: Path, s3: S3Server) -> None:
    """Written as the rows come, an export that fills its volume midway is NO_SPACE_LEFT and leaves
    neither the file nor its temporary twin."""
    with mounted_tmpfs(tmp_path / "small", 256 * 1024) as volume:
        storage = Storage(Settings(data_roots=[volume], export_uris=[f"file://{volume}/exports"]))
        rows = ({"rank": i, "key": f"images/{i:08d}.png", "score": 0.5} for i in range(50_000))
        with pytest.raises(ResourceExhausted) as caught:
            write_export(rows, f"file://{volume}/exports/scores.jsonl", ExportFormat.JSONL, storage)
        assert caught.value.reason == "NO_SPACE_LEFT"
        assert list((volume / "exports").iterdir()) == []


MANY = 80_000  # of 200-250 bytes (deep object keys): 16-19 MB, four 5 MiB parts
LATE = 64_000  # a row by which two parts are up


def _many_rows(count: int) -> Iterator[dict[str, object]]:
    folders = "catalogue/2026/winter-collection/product-photos/front-view/high-resolution/" * 2
    return (
        {
            "rank": i,
            "key": f"{folders}é-{i % 10}/{i:08d}.png",
            "score": 0.123456789 * i,
            "suspected": i % 3 == 0,
        }
        for i in range(count)
    )


def _uploads_in_progress(s3: S3Server) -> list[str]:
    """The multipart uploads the bucket still holds (parts that were neither completed nor aborted)."""
    return [upload.upload_id for upload in s3.client()._list_multipart_uploads(BUCKET).uploads]


@pytest.fixture
def small_parts(monkeypatch: pytest.MonkeyPatch) -> int:
    """Parts of 5 MiB, the least S3 takes, so that an export of a few parts stays quick."""
    monkeypatch.setattr(objectstore, "PART_BYTES", 5 * objectstore.MIB)
    return objectstore.PART_BYTES


@pytest.mark.parametrize("export_format", [ExportFormat.JSONL, ExportFormat.CSV])
def test_an_object_export_is_uploaded_a_part_at_a_time(
    storage: Storage, root: Path, s3: S3Server, small_parts: int, export_format: ExportFormat
) -> None:
    """An s3:// export is sent in parts as the rows come (a multipart upload completed with
    If-None-Match), holding about one part in memory, not the file: the same bytes as a file export."""
    name = f"exports/parts.{export_format.name.lower()}"
    tracemalloc.start()
    try:
        _, size = write_export(_many_rows(MANY), f"s3://{BUCKET}/{name}", export_format, storage)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert size > 2.5 * small_parts
    assert peak < 1.5 * small_parts, "about the part being filled or sent, no more"
    etag = storage.stat(f"s3://{BUCKET}/{name}").etag
    assert etag.endswith(f"-{-(-size // small_parts)}"), "a multipart object's ETag counts its parts"
    write_export(_many_rows(MANY), f"file://{root}/{name}", export_format, storage)
    assert s3.get(BUCKET, name) == (root / name).read_bytes()
    assert _uploads_in_progress(s3) == []


def test_a_large_object_export_never_replaces_an_object(
    storage: Storage, s3: S3Server, small_parts: int
) -> None:
    """A name taken before the export starts is refused before any part is sent; one taken while
    the parts go up is refused at completion (If-None-Match). Either way the object is untouched
    and no parts are left behind."""
    s3.put(BUCKET, "exports/taken.csv", b"someone's object")
    uri = f"s3://{BUCKET}/exports/taken.csv"
    with pytest.raises(AlreadyExists) as caught:
        write_export(_many_rows(MANY), uri, ExportFormat.CSV, storage)
    assert caught.value.reason == "DESTINATION_EXISTS"
    assert storage.read_bytes(uri) == b"someone's object"

    def rows_while_another_writer_takes_the_name() -> Iterator[dict[str, object]]:
        for row in _many_rows(MANY):
            if row["rank"] == LATE:  # several parts are up by now
                s3.put(BUCKET, "exports/raced.csv", b"the other writer's object")
            yield row

    raced = f"s3://{BUCKET}/exports/raced.csv"
    with pytest.raises(AlreadyExists):
        write_export(rows_while_another_writer_takes_the_name(), raced, ExportFormat.CSV, storage)
    assert storage.read_bytes(raced) == b"the other writer's object"
    assert _uploads_in_progress(s3) == []


def test_an_object_export_that_fails_midway_leaves_no_object_and_no_parts(
    storage: Storage, s3: S3Server, small_parts: int
) -> None:
    def rows_failing_late() -> Iterator[dict[str, object]]:
        for row in _many_rows(MANY):
            if row["rank"] == LATE:
                raise RuntimeError("the job store went away")
            yield row

    with pytest.raises(RuntimeError, match="went away"):
        write_export(rows_failing_late(), f"s3://{BUCKET}/exports/failed.csv", ExportFormat.CSV, storage)
    with pytest.raises(NotFound):
        storage.stat(f"s3://{BUCKET}/exports/failed.csv")
    assert _uploads_in_progress(s3) == []


def test_a_parquet_object_export_is_sent_a_row_group_at_a_time(
    storage: Storage, root: Path, s3: S3Server, small_parts: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Parquet export is encoded a row group at a time into the object's parts, holding a part and
    a group in memory, not the table and the file (15 MB here): the same bytes as a file export."""
    monkeypatch.setattr(parquet_export, "ROW_GROUP_ROWS", 1_024)
    count, name, columns = 40_000, "exports/groups.parquet", ("rank", "key", "score", "suspected")

    def rows() -> Iterator[dict[str, object]]:
        random = np.random.default_rng(0)  # random keys and scores: the file barely compresses
        for i in range(count):
            yield {
                "rank": i + 1,
                "key": random.bytes(360).hex(),
                "score": random.random(),
                "suspected": i % 3 == 0,
            }

    parquet_export.write_parquet(
        [{"rank": 1}], columns, io.BytesIO()
    )  # pyarrow imports pandas at its first write
    tracemalloc.start()
    try:
        written, size = write_export(
            rows(), f"s3://{BUCKET}/{name}", ExportFormat.PARQUET, storage, columns=columns
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert written == count
    assert size > 2.5 * small_parts
    assert peak < 2 * small_parts, (
        "the part being filled and the group being encoded (under 1 MB), not the file"
    )
    assert storage.stat(f"s3://{BUCKET}/{name}").etag.endswith(f"-{-(-size // small_parts)}")
    data = s3.get(BUCKET, name)
    parquet = pq.ParquetFile(io.BytesIO(data))
    assert parquet.metadata.num_row_groups == -(-count // 1_024)
    assert parquet.read(columns=["rank"]).column("rank").to_pylist() == list(range(1, count + 1))
    write_export(rows(), f"file://{root}/{name}", ExportFormat.PARQUET, storage, columns=columns)
    assert data == (root / name).read_bytes()
    assert _uploads_in_progress(s3) == []


def test_a_label_studio_object_export_is_sent_a_task_at_a_time(
    storage: Storage, root: Path, s3: S3Server, small_parts: int
) -> None:
    """Label Studio tasks are encoded one at a time into the object's parts (the suspects, by rank,
    are gathered first): one JSON array of the suspects only, the same bytes as a file export."""
    spec = JobSpec(f"s3://{BUCKET}/batch/", DatasetFormat.IMAGE_FOLDER, {})
    job = Job("job-ls", spec, JobState.SUCCEEDED, create_time=0.0, update_time=0.0)
    count, name = 40_000, "exports/tasks.json"

    def rows() -> Iterator[dict[str, object]]:
        for rank in range(count, 0, -1):  # out of order: the export sorts its suspects by rank
            yield {
                "rank": rank,
                "sample_id": rank - 1,
                "key": f"images/cat/{rank:08d}.png",
                "score": 1.0 / rank,
                "noise_probability": 0.5,
                "suspected": rank % 4 != 0,
                "given_label_name": "cat",
                "suggested_label_name": "dog",
                "suggested_label_confidence": 0.75,
            }

    written, size = write_export(rows(), f"s3://{BUCKET}/{name}", ExportFormat.LABEL_STUDIO, storage, job=job)
    assert written == count * 3 // 4
    assert size > 2.5 * small_parts
    assert storage.stat(f"s3://{BUCKET}/{name}").etag.endswith(f"-{-(-size // small_parts)}")
    data = s3.get(BUCKET, name)
    tasks = json.loads(data)
    assert [task["data"]["o2u_rank"] for task in tasks] == [rank for rank in range(1, count + 1) if rank % 4]
    assert tasks[0]["data"]["image"] == f"s3://{BUCKET}/batch/images/cat/00000001.png"
    write_export(rows(), f"file://{root}/{name}", ExportFormat.LABEL_STUDIO, storage, job=job)
    assert data == (root / name).read_bytes()
    assert _uploads_in_progress(s3) == []
