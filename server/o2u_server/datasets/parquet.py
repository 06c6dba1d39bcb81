"""The Parquet format: one row per sample with a `label` column (integers or strings), an optional
`key` column (strings; default the row number) and a `features` column of embeddings (a
fixed-size list or a list of floats, the same length in every row).

The file's size comes from its stat or listing before anything is read, the row count and the
columns' types from the footer before any column is decoded, and the embedding width from the
schema (fixed-size lists) or the first row group (lists), so `max_samples` and
`max_decoded_bytes` are checked before the feature matrix is allocated. The matrix is then filled
one row group at a time, reading only the three columns, so the peak is the float32 matrix plus
one row group's columns: for a million 512-d rows no more than the `.npz` path needs.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from o2u_server.datasets.dataset import (
    DatasetLimits,
    LoadedDataset,
    empty_dataset,
    invalid_dataset,
    too_large,
    too_many_samples,
    too_much_decoded,
)
from o2u_server.datasets.labels import encode_labels
from o2u_server.storage import Storage
from o2u_server.text import shown

__all__ = ["FEATURES_COLUMN", "KEY_COLUMN", "LABEL_COLUMN", "load_parquet"]

LABEL_COLUMN = "label"
KEY_COLUMN = "key"
FEATURES_COLUMN = "features"


def _open(uri: str, storage: Storage, limits: DatasetLimits, field: str) -> tuple[Any, int, bool]:
    handle = storage.open_local(uri, field=field)
    if handle is not None:
        size = os.fstat(handle.fileno()).st_size
        if size > limits.max_bytes:
            handle.close()
            raise too_large(shown(uri), size, limits)
        return handle, size, True
    size = storage.stat(uri, field=field).size
    if size > limits.max_bytes:
        raise too_large(shown(uri), size, limits)
    buffer = storage.read_buffer(uri, field=field, max_bytes=limits.max_bytes)
    return pa.BufferReader(pa.py_buffer(buffer)), size, False


def _width(where: str, parquet: pq.ParquetFile, column_type: pa.DataType) -> int:
    if pa.types.is_fixed_size_list(column_type):
        return int(column_type.list_size)
    first = parquet.read_row_group(0, columns=[FEATURES_COLUMN]).column(0)
    lengths = first.combine_chunks().value_lengths() if first.num_chunks else pa.array([], pa.int32())
    if len(lengths) == 0 or lengths.null_count:
        raise invalid_dataset(f"{where}: the {FEATURES_COLUMN} column has empty or null rows")
    return int(pa.compute.max(lengths).as_py())


def _check_schema(where: str, schema: pa.Schema) -> pa.DataType:
    names = set(schema.names)
    missing = [name for name in (LABEL_COLUMN, FEATURES_COLUMN) if name not in names]
    if missing:
        raise invalid_dataset(
            f"{where} lacks the column(s) {', '.join(missing)}; it holds {', '.join(schema.names) or 'none'} "
            f"(expected {LABEL_COLUMN}, {FEATURES_COLUMN}: a list of floats, optional {KEY_COLUMN})"
        )
    features = schema.field(FEATURES_COLUMN).type
    is_list = (
        pa.types.is_list(features)
        or pa.types.is_large_list(features)
        or pa.types.is_fixed_size_list(features)
    )
    if not is_list or not (
        pa.types.is_floating(features.value_type) or pa.types.is_integer(features.value_type)
    ):
        raise invalid_dataset(f"{where}: {FEATURES_COLUMN} must be a list of numbers, got {features}")
    label = schema.field(LABEL_COLUMN).type
    if not (pa.types.is_integer(label) or pa.types.is_string(label) or pa.types.is_large_string(label)):
        raise invalid_dataset(f"{where}: {LABEL_COLUMN} must be integers or strings, got {label}")
    if KEY_COLUMN in names and not pa.types.is_string(schema.field(KEY_COLUMN).type):
        raise invalid_dataset(f"{where}: {KEY_COLUMN} must be strings, got {schema.field(KEY_COLUMN).type}")
    return features


def _fill(
    where: str, parquet: pq.ParquetFile, features: np.ndarray[Any, Any], has_key: bool
) -> tuple[list[Any], list[str]]:
    labels: list[Any] = []
    keys: list[str] = []
    columns = [LABEL_COLUMN, FEATURES_COLUMN] + ([KEY_COLUMN] if has_key else [])
    row = 0
    width = features.shape[1]
    for group in range(parquet.num_row_groups):
        table = parquet.read_row_group(group, columns=columns)
        column = table.column(FEATURES_COLUMN).combine_chunks()
        if column.null_count or table.column(LABEL_COLUMN).null_count:
            raise invalid_dataset(f"{where}: row group {group} has null labels or features")
        lengths = (
            np.full(len(column), width)
            if pa.types.is_fixed_size_list(column.type)
            else column.value_lengths().to_numpy()
        )
        if len(lengths) and (lengths != width).any():
            bad = row + int(np.flatnonzero(lengths != width)[0])
            raise invalid_dataset(
                f"{where}: row {bad} has {int(lengths[lengths != width][0])} features, not {width}"
            )
        values = column.flatten().to_numpy(zero_copy_only=False)
        features[row : row + len(column)] = values.reshape(len(column), width)
        labels.extend(table.column(LABEL_COLUMN).to_pylist())
        if has_key:
            key_values = table.column(KEY_COLUMN).to_pylist()
            if any(key is None or key == "" for key in key_values):
                raise invalid_dataset(f"{where}: row group {group} has empty keys")
            keys.extend(key_values)
        row += len(column)
        del table, column, values
    return labels, keys


def load_parquet(uri: str, storage: Storage, limits: DatasetLimits, field: str) -> LoadedDataset:
    where = shown(uri)
    source, size, local = _open(uri, storage, limits, field)
    try:
        try:
            parquet = pq.ParquetFile(source)
        except (pa.ArrowException, OSError) as error:
            raise invalid_dataset(f"{where} is not a readable Parquet file: {error}") from error
        count = parquet.metadata.num_rows
        if count > limits.max_samples:
            raise too_many_samples(where, count, limits)
        if count == 0:
            raise empty_dataset(where, "the file has no rows")
        feature_type = _check_schema(where, parquet.schema_arrow)
        width = _width(where, parquet, feature_type)
        if width <= 0:
            raise invalid_dataset(f"{where}: {FEATURES_COLUMN} rows are empty")
        decoded = count * width * 4
        if decoded > limits.max_decoded_bytes:
            raise too_much_decoded(f"{where} (its features, decoded)", decoded, limits)
        features = np.empty((count, width), dtype=np.float32)
        has_key = KEY_COLUMN in parquet.schema_arrow.names
        try:
            raw_labels, keys = _fill(where, parquet, features, has_key)
        except (pa.ArrowException, OSError) as error:
            raise invalid_dataset(f"{where}: unreadable row group: {error}") from error
    finally:
        if isinstance(source, io.IOBase):
            source.close()
    if has_key and len(set(keys)) != len(keys):
        raise invalid_dataset(f"{where}: keys must be unique")
    labels, names = encode_labels(np.asarray(raw_labels), class_names=None, where=where, limits=limits)
    if local:
        storage.reads.add(size, files=1)  # a download counted itself
    return LoadedDataset(
        features=features,
        labels=labels,
        keys=keys if has_key else [str(i) for i in range(count)],
        class_names=names,
        bytes_read=size,
        source="file" if local else "s3",
        files_read=1,
    )
