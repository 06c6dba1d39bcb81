"""The Parquet dataset format and the Parquet export, on real files and a real S3 server."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from o2u_server.datasets import infer_format, load_dataset
from o2u_server.datasets.exports import EXPORT_COLUMNS, infer_export_format, write_export
from o2u_server.domain import DatasetFormat, ExportFormat
from o2u_server.errors import InvalidArgument, ResourceExhausted
from tests.o2u_server.dataset_files import LIMITS, Store
from tests.s3_server import S3Server


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, root: Path, s3: S3Server) -> Store:
    return Store(root, s3, request.param)


def parquet_bytes(table: pa.Table, row_group_size: int | None = None) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=row_group_size)
    return sink.getvalue()


def embeddings(
    n: int, d: int, fixed: bool, labels: list[object] | None = None, keys: bool = True
) -> pa.Table:
    x = np.arange(n * d, dtype=np.float32).reshape(n, d) / 7
    flat = pa.array(x.reshape(-1))
    features = (
        pa.FixedSizeListArray.from_arrays(flat, d)
        if fixed
        else pa.ListArray.from_arrays(pa.array(np.arange(0, n * d + 1, d, dtype=np.int32)), flat)
    )
    columns = {
        "label": pa.array(labels if labels is not None else [i % 3 for i in range(n)]),
        "features": features,
    }
    if keys:
        columns["key"] = pa.array([f"item-{i:03d}" for i in range(n)])
    return pa.table(columns)


@pytest.mark.parametrize("fixed", [True, False])
def test_embeddings_round_trip_in_row_groups(store: Store, fixed: bool) -> None:
    table = embeddings(50, 8, fixed)
    data = parquet_bytes(table, row_group_size=7)
    assert pq.ParquetFile(io.BytesIO(data)).num_row_groups == 8
    uri = store.put("sets/emb.parquet", data)
    assert infer_format(uri) == DatasetFormat.PARQUET
    dataset = load_dataset(uri, None, store.storage, LIMITS)
    np.testing.assert_array_equal(dataset.features, np.arange(400, dtype=np.float32).reshape(50, 8) / 7)
    assert dataset.features.dtype == np.float32
    np.testing.assert_array_equal(dataset.labels, np.arange(50) % 3)
    assert dataset.keys == [f"item-{i:03d}" for i in range(50)]
    assert dataset.class_names == ["0", "1", "2"]
    assert dataset.bytes_read == len(data)
    assert dataset.source == store.scheme


def test_string_labels_and_row_number_keys(store: Store) -> None:
    labels = ["cat", "dog", "emu", "dog"]
    uri = store.put("sets/names.parquet", parquet_bytes(embeddings(4, 3, True, labels=labels, keys=False)))
    dataset = load_dataset(uri, DatasetFormat.PARQUET, store.storage, LIMITS)
    assert dataset.class_names == ["cat", "dog", "emu"]
    assert dataset.labels.tolist() == [0, 1, 2, 1]
    assert dataset.keys == ["0", "1", "2", "3"]


def test_limits_are_checked_from_the_footer(store: Store) -> None:
    uri = store.put("sets/big.parquet", parquet_bytes(embeddings(40, 16, False)))
    with pytest.raises(ResourceExhausted, match="max_samples"):
        load_dataset(uri, None, store.storage, dataclasses.replace(LIMITS, max_samples=39))
    with pytest.raises(ResourceExhausted, match="max_decoded_bytes"):
        load_dataset(uri, None, store.storage, dataclasses.replace(LIMITS, max_decoded_bytes=40 * 16 * 4 - 1))
    with pytest.raises(ResourceExhausted):
        load_dataset(uri, None, store.storage, dataclasses.replace(LIMITS, max_bytes=100))


def test_malformed_files_are_invalid_argument(store: Store) -> None:
    no_features = pa.table({"label": [0, 1], "key": ["a", "b"]})
    uri = store.put("sets/nofeat.parquet", parquet_bytes(no_features))
    with pytest.raises(InvalidArgument, match=r"embedding_column 'features' is not a column"):
        load_dataset(uri, None, store.storage, LIMITS)
    ragged = pa.table({"label": [0, 1, 0], "features": pa.array([[1.0, 2.0], [3.0], [4.0, 5.0]])})
    uri = store.put("sets/ragged.parquet", parquet_bytes(ragged))
    with pytest.raises(InvalidArgument, match="row 1 has 1 features, not 2"):
        load_dataset(uri, None, store.storage, LIMITS)
    duplicate = pa.table({"label": [0, 1], "key": ["a", "a"], "features": pa.array([[1.0], [2.0]])})
    uri = store.put("sets/dup.parquet", parquet_bytes(duplicate))
    with pytest.raises(InvalidArgument, match="unique"):
        load_dataset(uri, None, store.storage, LIMITS)
    uri = store.put("sets/junk.parquet", b"PAR1 not really")
    with pytest.raises(InvalidArgument, match="not a readable Parquet file"):
        load_dataset(uri, None, store.storage, LIMITS)


def test_parquet_export_round_trip(store: Store) -> None:
    rows = [
        {
            name: (i if name in ("rank", "sample_id", "given_label", "suggested_label") else None)
            for name in EXPORT_COLUMNS
        }
        | {"key": f"k{i}", "score": 1.5 - i, "suspected": i == 0, "given_label_name": "cat"}
        for i in range(3)
    ]
    uri = store.uri("exports/run-1/scores.parquet")
    assert infer_export_format(uri) == ExportFormat.PARQUET
    count, size = write_export(rows, uri, ExportFormat.PARQUET, store.storage)
    assert count == 3
    data = store.storage.read_bytes(uri)
    assert len(data) == size
    table = pq.read_table(io.BytesIO(data))
    assert table.column_names == list(EXPORT_COLUMNS)
    assert table.schema.field("score").type == pa.float64()
    assert table.schema.field("suspected").type == pa.bool_()
    assert table.column("key").to_pylist() == ["k0", "k1", "k2"]
    assert table.column("suspected").to_pylist() == [True, False, False]
