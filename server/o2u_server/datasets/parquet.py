"""The Parquet format: one row per sample with a label column (integers or strings), an optional key
column (strings; default the row number) and either an embedding column (a fixed-size list or a
list of floats, the same length in every row) or a column of image object keys.

The columns are `label`, `key` and `features` unless the job's ParquetOptions name others (the
default `key` column is not read when the options name it as the label or embedding column); with
`image_key_column` set, the samples are the images that column names, relative to the Parquet
file's folder (checked and read as a CSV manifest's keys are, `datasets.manifests`), and the keys
default to the image keys. A column the options name that the file lacks is INVALID_ARGUMENT
naming the option (`options.missing_column`).

The file's size comes from its stat or listing before anything is read, the row count and the
columns' types from the footer before any column is decoded, and the embedding width from the
schema (fixed-size lists) or the first row group (lists), so `max_samples` and
`max_decoded_bytes` are checked before the feature matrix is allocated. The matrix is then filled
one row group at a time, reading only the named columns, so the peak is the float32 matrix plus
one row group's columns: for a million 512-d rows no more than the `.npz` path needs.

Parquet's encodings let a small file declare a great deal: a dictionary page holding one long
string that every row refers to, or run-length-encoded lists. So before a row group is read, the
page headers of every column read are walked (`parquet_pages`: the reader decodes what the pages
declare, not what the footer counts, which a crafted file understates): the values they declare,
at the width of one decoded value, and their uncompressed sizes are each held to
`max_decoded_bytes` over the row group's columns. The string columns are read dictionary-encoded,
their length once expanded summed from the dictionary and the indices and held to the same limit
before any string is built. A row group is read only after the job's read monitor says it may go
on: a cancelled job or a draining server stops between row groups.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from o2u_server.datasets.dataset import (
    Allocate,
    DatasetLimits,
    LoadedDataset,
    empty_dataset,
    invalid_dataset,
    too_large,
    too_many_samples,
    too_much_decoded,
)
from o2u_server.datasets.labels import encode_labels
from o2u_server.datasets.manifests import ManifestRow, load_listed_images, parse_manifest
from o2u_server.datasets.options import (
    DEFAULT_EMBEDDING_COLUMN,
    DEFAULT_KEY_COLUMN,
    DEFAULT_LABEL_COLUMN,
    missing_column,
)
from o2u_server.datasets.parquet_pages import PageHeaderError, chunk_pages
from o2u_server.domain import DatasetOptions, ParquetOptions
from o2u_server.storage import Storage
from o2u_server.text import shown

__all__ = ["Columns", "load_parquet", "resolve_columns"]


@dataclass(frozen=True)
class Columns:
    """The columns read, resolved against the file's schema."""

    label: str
    key: str | None  # None: the file has no (default) key column
    features: str | None  # the embeddings; None in image-key mode
    image_key: str | None  # the image object keys; None in embedding mode

    @property
    def names(self) -> list[str]:
        return list(dict.fromkeys(c for c in (self.label, self.features, self.image_key, self.key) if c))


def resolve_columns(options: ParquetOptions, schema: pa.Schema, where: str) -> Columns:
    """The columns `options` name (defaults filled in), each checked to be in `schema` and typed."""
    names = list(schema.names)
    wanted = {
        "label_column": options.label_column or DEFAULT_LABEL_COLUMN,
        "image_key_column" if options.image_key_column else "embedding_column": (
            options.image_key_column or options.embedding_column or DEFAULT_EMBEDDING_COLUMN
        ),
    }
    if options.key_column:
        wanted["key_column"] = options.key_column
    for option, column in wanted.items():
        if column not in names:
            raise missing_column(option, column, where, names)
    key = options.key_column or (DEFAULT_KEY_COLUMN if DEFAULT_KEY_COLUMN in names else None)
    if not options.key_column and key in (wanted["label_column"], wanted.get("embedding_column")):
        key = None  # the default key column is the caller's label or embedding column
    columns = Columns(
        label=wanted["label_column"],
        key=key,
        features=wanted.get("embedding_column"),
        image_key=wanted.get("image_key_column"),
    )
    _check_types(where, schema, columns)
    return columns


def _is_string(column_type: pa.DataType) -> bool:
    """Strings, plain or dictionary-encoded (a pandas categorical of strings)."""
    if pa.types.is_dictionary(column_type):
        column_type = column_type.value_type
    return bool(pa.types.is_string(column_type) or pa.types.is_large_string(column_type))


def _check_types(where: str, schema: pa.Schema, columns: Columns) -> None:
    label = schema.field(columns.label).type
    if not (pa.types.is_integer(label) or _is_string(label)):
        raise invalid_dataset(
            f"{where}: the label column {columns.label} must be integers or strings, got {label}"
        )
    for name in (columns.key, columns.image_key):
        if name is not None and not _is_string(schema.field(name).type):
            raise invalid_dataset(f"{where}: column {name} must be strings, got {schema.field(name).type}")
    if columns.features is None:
        return
    features = schema.field(columns.features).type
    is_list = (
        pa.types.is_list(features)
        or pa.types.is_large_list(features)
        or pa.types.is_fixed_size_list(features)
    )
    if not is_list or not (
        pa.types.is_floating(features.value_type) or pa.types.is_integer(features.value_type)
    ):
        raise invalid_dataset(
            f"{where}: the embedding column {columns.features} must be a list of numbers, got {features}"
        )


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


@dataclass(frozen=True)
class _File:
    """An open Parquet file, and what reading it is held to."""

    where: str
    parquet: pq.ParquetFile
    read_at: Callable[[int, int], bytes]  # (offset, size) -> the file's bytes there
    limits: DatasetLimits
    check: Callable[[], None]  # raises Stopped for a cancelled job or a draining server

    def read(self, group: int, names: list[str], *, checked: bool = True) -> pa.Table:
        """Row group `group`'s columns `names`, once the job may go on (unless not `checked`) and
        their pages' declared sizes fit max_decoded_bytes."""
        if checked:
            self.check()
        self._check_declared(group, names)
        return self.parquet.read_row_group(group, columns=names)

    def _check_declared(self, group: int, names: list[str]) -> None:
        """Refuse a row group whose columns `names`, as their pages declare them, decode past the
        limit (see the module docstring): their values at the width of one decoded value, or
        their uncompressed pages. A page header that cannot be read is INVALID_DATASET."""
        row_group = self.parquet.metadata.row_group(group)
        schema = self.parquet.schema_arrow
        values = uncompressed = 0
        for index in range(row_group.num_columns):
            chunk = row_group.column(index)
            path = chunk.path_in_schema
            # a leaf of a list is "name.list.element"; a name that holds dots counts for each prefix
            for name in (n for n in names if path == n or path.startswith(n + ".")):
                start = chunk.data_page_offset
                if chunk.has_dictionary_page and 0 < chunk.dictionary_page_offset < start:
                    start = chunk.dictionary_page_offset
                try:
                    pages = chunk_pages(
                        self.read_at, start, chunk.total_compressed_size, chunk.num_values, self.check
                    )
                except PageHeaderError as error:
                    raise invalid_dataset(
                        f"{self.where}: row group {group} of column {name} is unreadable: {error}"
                    ) from error
                values += pages.values * _decoded_width(schema.field(name).type)
                uncompressed += pages.uncompressed_bytes
        for what, size in (("values", values), ("pages, uncompressed", uncompressed)):
            if size > self.limits.max_decoded_bytes:
                where = (
                    f"{self.where} (row group {group}: the {what} of columns {', '.join(names)}, as declared)"
                )
                raise too_much_decoded(where, size, self.limits)


def _decoded_width(column_type: pa.DataType) -> int:
    """Bytes one value of a column takes decoded: a list's element (a number) at its width, any
    other value (an integer label, a dictionary index or a string's offset) at 8."""
    if (
        pa.types.is_list(column_type)
        or pa.types.is_large_list(column_type)
        or pa.types.is_fixed_size_list(column_type)
    ):
        return max(1, int(column_type.value_type.bit_width) // 8)
    return 8


def _read_at(source: Any) -> Callable[[int, int], bytes]:
    """(offset, size) -> bytes of a local file handle or of an in-memory pyarrow buffer reader."""
    if isinstance(source, pa.NativeFile):
        return lambda offset, size: bytes(source.read_at(size, offset))
    descriptor = source.fileno()
    return lambda offset, size: os.pread(descriptor, size, offset)


def _width(file: _File, column: str) -> int:
    column_type = file.parquet.schema_arrow.field(column).type
    if pa.types.is_fixed_size_list(column_type):
        return int(column_type.list_size)
    first = file.read(0, [column], checked=False).column(0)
    lengths = first.combine_chunks().value_lengths() if first.num_chunks else pa.array([], pa.int32())
    if len(lengths) == 0 or lengths.null_count:
        raise invalid_dataset(f"{file.where}: the embedding column {column} has empty or null rows")
    return int(pa.compute.max(lengths).as_py())


class StringBudget:
    """What the string columns may take once expanded from their dictionaries: max_decoded_bytes,
    shared by every string column and row group of the file."""

    def __init__(self, where: str, limits: DatasetLimits) -> None:
        self.where = where
        self.limits = limits
        self.used = 0

    def strings(self, table: pa.Table, column: str, group: int) -> list[Any]:
        """The column's values as Python objects, once their expanded length fits the budget."""
        values = table.column(column).combine_chunks()
        if pa.types.is_dictionary(values.type):
            lengths = pa.compute.binary_length(values.dictionary).take(values.indices)
            self.used += int(pa.compute.sum(lengths).as_py() or 0)
        elif _is_string(values.type):
            self.used += int(pa.compute.sum(pa.compute.binary_length(values)).as_py() or 0)
        if self.used > self.limits.max_decoded_bytes:
            what = f"{self.where} (its string columns, expanded, through row group {group} of {column})"
            raise too_much_decoded(what, self.used, self.limits)
        result: list[Any] = values.to_pylist()
        return result


def _keys(where: str, budget: StringBudget, table: pa.Table, column: str, group: int) -> list[str]:
    values: list[str] = budget.strings(table, column, group)
    if any(value is None or value == "" for value in values):
        raise invalid_dataset(f"{where}: row group {group} has empty values in column {column}")
    return values


def _fill(file: _File, features: np.ndarray[Any, Any], columns: Columns) -> tuple[list[Any], list[str]]:
    assert columns.features is not None
    where = file.where
    labels: list[Any] = []
    keys: list[str] = []
    budget = StringBudget(where, file.limits)
    row = 0
    width = features.shape[1]
    for group in range(file.parquet.num_row_groups):
        table = file.read(group, columns.names)
        column = table.column(columns.features).combine_chunks()
        if column.null_count or table.column(columns.label).null_count:
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
        labels.extend(budget.strings(table, columns.label, group))
        if columns.key is not None:
            keys.extend(_keys(where, budget, table, columns.key, group))
        row += len(column)
        del table, column, values
    return labels, keys


def _image_rows(file: _File, columns: Columns, keys: list[str]) -> Iterator[ManifestRow]:
    """(row number, image key, label) per row, one row group at a time; sample keys into `keys`."""
    assert columns.image_key is not None
    where = file.where
    budget = StringBudget(where, file.limits)
    row = 0
    for group in range(file.parquet.num_row_groups):
        table = file.read(group, columns.names)
        if table.column(columns.label).null_count:
            raise invalid_dataset(f"{where}: row group {group} has null labels")
        image_keys = _keys(where, budget, table, columns.image_key, group)
        if columns.key is not None:
            keys.extend(_keys(where, budget, table, columns.key, group))
        labels = budget.strings(table, columns.label, group)
        for image_key, label in zip(image_keys, labels, strict=True):
            yield row, image_key, label
            row += 1
        del table


def _load_embeddings(
    file: _File, columns: Columns, allocate: Allocate
) -> tuple[np.ndarray[Any, Any], list[Any], list[str]]:
    assert columns.features is not None
    where, limits = file.where, file.limits
    count = file.parquet.metadata.num_rows
    width = _width(file, columns.features)
    if width <= 0:
        raise invalid_dataset(f"{where}: the rows of the embedding column {columns.features} are empty")
    decoded = count * width * 4
    if decoded > limits.max_decoded_bytes:
        raise too_much_decoded(f"{where} (its features, decoded)", decoded, limits)
    features = allocate((count, width), np.dtype(np.float32))
    raw_labels, keys = _fill(file, features, columns)
    return features, raw_labels, keys


def _check_unique(where: str, keys: list[str], columns: Columns) -> None:
    if columns.key is not None and len(set(keys)) != len(keys):
        raise invalid_dataset(f"{where}: keys (column {columns.key}) must be unique")


def load_parquet(
    uri: str, storage: Storage, limits: DatasetLimits, field: str, options: DatasetOptions, allocate: Allocate
) -> LoadedDataset:
    where = shown(uri)
    source, size, local = _open(uri, storage, limits, field)
    image_keys: list[str] = []
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
        schema = parquet.schema_arrow
        columns = resolve_columns(options.parquet or ParquetOptions(), schema, where)
        strings = [name for name in columns.names if _is_string(schema.field(name).type)]
        if strings:  # read dictionary-encoded, so that StringBudget sizes them before they expand
            parquet = pq.ParquetFile(source, metadata=parquet.metadata, read_dictionary=strings)
        keys: list[str] = []
        file = _File(where, parquet, _read_at(source), limits, storage.reads.check)
        try:
            if columns.image_key is None:
                features, raw_labels, keys = _load_embeddings(file, columns, allocate)
            else:
                rows = _image_rows(file, columns, keys)
                image_keys, raw_labels = parse_manifest(rows, uri=uri, limits=limits)
        except (pa.ArrowException, OSError) as error:
            raise invalid_dataset(f"{where}: unreadable row group: {error}") from error
    finally:
        if isinstance(source, io.IOBase):
            source.close()
    _check_unique(where, keys, columns)
    if local:
        storage.reads.add(size, files=1)  # a download counted itself
    if columns.image_key is not None:
        dataset = load_listed_images(
            uri, image_keys, raw_labels, storage, limits, field, allocate, manifest_bytes=size
        )
        dataset.source = "file" if local else "s3"
        if columns.key is not None:
            dataset.keys = keys
        return dataset
    labels, names = encode_labels(raw_labels, class_names=None, where=where, limits=limits)
    return LoadedDataset(
        features=features,
        labels=labels,
        keys=keys if columns.key is not None else [str(i) for i in range(count)],
        class_names=names,
        bytes_read=size,
        source="file" if local else "s3",
        files_read=1,
    )
