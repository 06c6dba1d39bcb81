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
from o2u_server.domain import DatasetFormat, DatasetOptions, ExportFormat, ParquetOptions
from o2u_server.errors import Code, InvalidArgument, NotFound, PermissionDenied, ResourceExhausted
from o2u_server.storage.reads import Stopped
from tests.o2u_server.dataset_files import COLOURS, LIMITS, Store, png, solid
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


def _one_string_everywhere(length: int, rows: int) -> pa.DictionaryArray:
    """`rows` references to one string of `length` characters: a few bytes in a dictionary page."""
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows, dtype=np.int32)), pa.array(["x" * length]))


@pytest.mark.parametrize("column", ["label", "key"])
@pytest.mark.parametrize("store_schema", [True, False])
def test_strings_that_expand_past_the_limit_are_refused_before_they_are_built(
    store: Store, column: str, store_schema: bool
) -> None:
    rows, length = 4_000, 64 * 1024  # 256 MiB of strings once expanded
    table = embeddings(rows, 2, True, keys=column == "key")
    table = table.set_column(
        table.schema.get_field_index(column), column, _one_string_everywhere(length, rows)
    )
    sink = io.BytesIO()
    pq.write_table(table, sink, store_schema=store_schema)  # without the Arrow schema: plain strings
    assert len(sink.getvalue()) < 256 * 1024
    uri = store.put(f"sets/expand-{column}.parquet", sink.getvalue())
    with pytest.raises(ResourceExhausted, match=rf"string columns, expanded.*{column}.*max_decoded_bytes"):
        load_dataset(uri, None, store.storage, dataclasses.replace(LIMITS, max_decoded_bytes=32 * 1024**2))


def test_categorical_string_labels_are_read(store: Store) -> None:
    table = embeddings(6, 2, True, keys=False)
    labels = pa.array(["cat", "dog", "cat", "emu", "dog", "cat"]).dictionary_encode()
    uri = store.put("sets/categorical.parquet", parquet_bytes(table.set_column(0, "label", labels)))
    dataset = load_dataset(uri, None, store.storage, LIMITS)
    assert dataset.class_names == ["cat", "dog", "emu"]
    assert dataset.labels.tolist() == [0, 1, 0, 2, 1, 0]


def test_run_length_lists_past_the_limit_are_refused_from_their_pages(store: Store) -> None:
    width = 1 << 22  # one row of four million equal floats: a few kilobytes on disk, 16 MiB decoded
    flat = pa.array(np.zeros(width, dtype=np.float32))
    features = pa.ListArray.from_arrays(pa.array([0, width], type=pa.int32()), flat)
    uri = store.put("sets/long-row.parquet", parquet_bytes(pa.table({"label": [0], "features": features})))
    with pytest.raises(ResourceExhausted, match=r"row group 0: the values of columns .*max_decoded_bytes"):
        load_dataset(uri, None, store.storage, dataclasses.replace(LIMITS, max_decoded_bytes=8 * 1024**2))


def _footer_saying(data: bytes, count: int, instead: int) -> bytes:
    """`data` with every field of value `count` in its footer (a zigzag varint) rewritten to say
    `instead`, padded to the same length, as a crafted file would."""

    def varint(value: int) -> bytearray:
        out = bytearray()
        while True:
            low, value = value & 0x7F, value >> 7
            out.append(low | (0x80 if value else 0))
            if not value:
                return out

    raw = bytearray(data)
    footer = len(raw) - 8 - int.from_bytes(raw[-8:-4], "little")
    target, padded = varint(2 * count), varint(2 * instead)
    assert len(padded) <= len(target)
    while len(padded) < len(target):  # a non-minimal varint: the same value in more bytes
        padded[-1] |= 0x80
        padded.append(0)
    position = raw.find(target, footer)
    assert position > 0, "the count is in the footer"
    while position > 0:
        raw[position : position + len(target)] = padded
        position = raw.find(target, position + len(target))
    return bytes(raw)


def test_a_footer_that_understates_its_values_is_refused_from_the_pages(store: Store) -> None:
    rows, width = 20, 50_000  # a million equal floats: under 2 KB on disk, 4 MB decoded
    flat = pa.array(np.zeros(rows * width, dtype=np.float32))
    features = pa.ListArray.from_arrays(pa.array(np.arange(0, rows * width + 1, width, dtype=np.int32)), flat)
    data = parquet_bytes(pa.table({"label": [0, 1] * (rows // 2), "features": features}))
    crafted = _footer_saying(data, rows * width, 10)
    metadata = pq.ParquetFile(io.BytesIO(crafted)).metadata
    assert metadata.row_group(0).column(1).num_values == 10
    decoded = pq.ParquetFile(io.BytesIO(crafted)).read_row_group(0, columns=["features"]).column(0)
    assert len(decoded.combine_chunks().flatten()) == rows * width, (
        "the reader decodes what the page declares"
    )
    uri = store.put("sets/understated.parquet", crafted)
    with pytest.raises(ResourceExhausted, match=r"row group 0: the values of columns .*max_decoded_bytes"):
        load_dataset(uri, None, store.storage, dataclasses.replace(LIMITS, max_decoded_bytes=2 * 1024**2))
    with pytest.raises(InvalidArgument, match="unreadable row group"):  # within the limit: read, then refused
        load_dataset(uri, None, store.storage, LIMITS)


def test_a_row_group_holding_more_rows_than_its_footer_says_is_invalid(store: Store) -> None:
    data = parquet_bytes(embeddings(1_000, 2, False, keys=False))
    uri = store.put("sets/more-rows.parquet", _footer_saying(data, 1_000, 10))
    with pytest.raises(
        InvalidArgument, match=r"unreadable row group: .*expected length 10 but got length 1000"
    ):
        load_dataset(uri, None, store.storage, LIMITS)


def test_an_unreadable_page_header_is_invalid(store: Store) -> None:
    data = bytearray(parquet_bytes(embeddings(50, 4, True)))
    chunk = pq.ParquetFile(io.BytesIO(bytes(data))).metadata.row_group(0).column(1)
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    data[start] = 0x1D  # field 1 of type 13, which the compact protocol does not have
    uri = store.put("sets/bad-page.parquet", bytes(data))
    with pytest.raises(
        InvalidArgument, match="row group 0 of column features is unreadable: unknown field type 13"
    ):
        load_dataset(uri, None, store.storage, LIMITS)


def test_a_cancelled_job_stops_between_row_groups(store: Store) -> None:
    uri = store.put("sets/groups.parquet", parquet_bytes(embeddings(50, 8, False), row_group_size=5))
    checks: list[int] = []

    def stop_at_the_fourth_check() -> bool:
        checks.append(1)
        return len(checks) >= 4

    with pytest.raises(Stopped):
        load_dataset(uri, None, store.storage.for_job(stop_at_the_fourth_check), LIMITS)
    assert len(checks) == 4, "one check per row group read, then none after the stop"


# ---- options: other column names, image keys ---------------------------------------------------------


def columns(**names: str) -> DatasetOptions:
    return DatasetOptions(parquet=ParquetOptions(**names))


@pytest.mark.parametrize("fixed", [True, False])
def test_other_column_names_are_read_and_the_default_ones_ignored(store: Store, fixed: bool) -> None:
    table = embeddings(20, 4, fixed).rename_columns(["y", "emb", "id"])
    assert pa.types.is_fixed_size_list(table.schema.field("emb").type) is fixed
    assert pa.types.is_list(table.schema.field("emb").type) is not fixed
    decoys = {"label": pa.array([5] * 20), "features": pa.array([[9.0]] * 20), "key": pa.array(["x"] * 20)}
    for name, decoy in decoys.items():  # the default columns, holding what must not be read
        table = table.append_column(name, decoy)
    uri = store.put("sets/renamed.parquet", parquet_bytes(table, row_group_size=6))
    options = columns(label_column="y", key_column="id", embedding_column="emb")
    dataset = load_dataset(uri, None, store.storage, LIMITS, options=options)
    np.testing.assert_array_equal(dataset.features, np.arange(80, dtype=np.float32).reshape(20, 4) / 7)
    assert dataset.labels.tolist() == [i % 3 for i in range(20)]
    assert dataset.keys == [f"item-{i:03d}" for i in range(20)]
    assert dataset.source == store.scheme


def test_the_default_key_column_is_not_read_when_named_for_another_role(store: Store) -> None:
    labels_in_key = pa.table({"key": [2, 0, 1], "features": pa.array([[1.0], [2.0], [3.0]])})
    uri = store.put("sets/labels-in-key.parquet", parquet_bytes(labels_in_key))
    dataset = load_dataset(uri, None, store.storage, LIMITS, options=columns(label_column="key"))
    assert (dataset.labels.tolist(), dataset.keys) == ([2, 0, 1], ["0", "1", "2"])
    embeddings_in_key = pa.table({"label": [1, 0], "key": pa.array([[1.0, 2.0], [3.0, 4.0]])})
    uri = store.put("sets/embeddings-in-key.parquet", parquet_bytes(embeddings_in_key))
    dataset = load_dataset(uri, None, store.storage, LIMITS, options=columns(embedding_column="key"))
    np.testing.assert_array_equal(dataset.features, [[1.0, 2.0], [3.0, 4.0]])
    assert dataset.keys == ["0", "1"]


@pytest.mark.parametrize(
    ("option", "column"),
    [
        ("label_column", "y"),
        ("key_column", "name"),
        ("embedding_column", "embedding"),
        ("image_key_column", "path"),
    ],
)
def test_a_named_column_the_file_lacks_is_unknown_column(store: Store, option: str, column: str) -> None:
    table = pa.table({"id": ["a", "b"], "cls": [0, 1], "emb": pa.array([[1.0], [2.0]])})
    uri = store.put("sets/columns.parquet", parquet_bytes(table))
    named = {"label_column": "cls", "key_column": "id", "embedding_column": "emb"}
    named.pop("embedding_column" if option == "image_key_column" else option)
    with pytest.raises(InvalidArgument) as caught:
        load_dataset(uri, None, store.storage, LIMITS, options=columns(**named, **{option: column}))
    error = caught.value
    assert (error.code, error.reason, error.field) == (
        Code.INVALID_ARGUMENT,
        "UNKNOWN_COLUMN",
        f"dataset.options.parquet.{option}",
    )
    assert error.message == (
        f"dataset.options.parquet.{option} {column!r} is not a column of {uri}; it holds id, cls, emb"
    )


def image_keys_file(store: Store, count: int, key_column: bool = False) -> tuple[str, list[str], list[str]]:
    """Images under `pq/images/` (two subfolders) and `pq/batch.parquet` naming them in its `path`
    column, labelled in `cls`, in row groups of 4; returns its URI, the image keys and the labels."""
    names = list(COLOURS)
    paths = [f"images/{'ab'[i % 2]}/{i:02d}.png" for i in range(count)]
    labels = [names[i % 3] for i in range(count)]
    for i, path in enumerate(paths):
        store.put(f"pq/{path}", png(solid(COLOURS[labels[i]], i)))
    table = {"path": paths, "cls": labels} | ({"id": [f"s{i}" for i in range(count)]} if key_column else {})
    return store.put("pq/batch.parquet", parquet_bytes(pa.table(table), row_group_size=4)), paths, labels


def test_image_keys_are_read_from_the_parquet_files_folder(store: Store) -> None:
    uri, paths, labels = image_keys_file(store, 10)
    dataset = load_dataset(
        uri, None, store.storage, LIMITS, options=columns(label_column="cls", image_key_column="path")
    )
    assert dataset.keys == paths, "without a key column the keys are the image keys"
    assert [dataset.class_names[label] for label in dataset.labels] == labels
    assert dataset.features.shape == (10, 5, 6, 3)
    for i, image in enumerate(dataset.features):
        np.testing.assert_array_equal(image, solid(COLOURS[labels[i]], i))
    parquet_size = len(store.storage.read_bytes(uri))
    assert dataset.bytes_read == parquet_size + sum(len(png(solid(COLOURS[labels[i]], i))) for i in range(10))
    assert dataset.files_read == 11
    assert dataset.source == store.scheme
    uri, _, _ = image_keys_file(store, 6, key_column=True)
    options = columns(label_column="cls", key_column="id", image_key_column="path")
    assert load_dataset(uri, None, store.storage, LIMITS, options=options).keys == [f"s{i}" for i in range(6)]


def test_a_missing_image_key_fails_as_in_an_image_manifest(store: Store) -> None:
    _, paths, labels = image_keys_file(store, 4)
    listed = [*paths, "images/b/missing.png"]
    table = pa.table({"path": listed, "cls": [*labels, "cat"]})
    uri = store.put("pq/batch.parquet", parquet_bytes(table))
    manifest = store.put("pq/labels.csv", ("key,label\n" + "".join(f"{p},cat\n" for p in listed)).encode())
    with pytest.raises(NotFound) as from_manifest:
        load_dataset(manifest, None, store.storage, LIMITS)
    with pytest.raises(NotFound) as from_parquet:
        load_dataset(
            uri, None, store.storage, LIMITS, options=columns(label_column="cls", image_key_column="path")
        )
    error, expected = from_parquet.value, from_manifest.value
    assert (error.reason, error.resource_type, error.resource_name) == (
        "OBJECT_NOT_FOUND",
        "object",
        store.uri("pq/images/b/missing.png"),
    )
    assert (error.reason, error.resource_type, error.resource_name) == (
        expected.reason,
        expected.resource_type,
        expected.resource_name,
    )
    assert error.message == expected.message.replace(manifest, uri)


@pytest.mark.parametrize(
    ("path", "error", "message"),
    [
        ("../outside.png", PermissionDenied, "leaves the manifest's folder"),
        ("/images/a/00.png", InvalidArgument, "relative to the manifest's folder"),
        ("images/a/00.png", InvalidArgument, "listed twice"),
        ("", InvalidArgument, "row group 0 has empty values in column path"),
    ],
)
def test_image_keys_are_checked_as_a_manifests_keys_are(
    store: Store, path: str, error: type[Exception], message: str
) -> None:
    store.put("pq/images/a/00.png", png(solid(COLOURS["cat"], 0)))
    table = pa.table({"path": ["images/a/00.png", path], "cls": ["cat", "dog"]})
    uri = store.put("pq/bad.parquet", parquet_bytes(table))
    with pytest.raises(error, match=message):
        load_dataset(
            uri, None, store.storage, LIMITS, options=columns(label_column="cls", image_key_column="path")
        )


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
