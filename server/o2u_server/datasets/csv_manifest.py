"""The CSV manifest format: a `key,label` header (other columns are ignored), one sample per row.

Keys are paths relative to the manifest's folder (`datasets.manifests` checks and locates them). A
label column made only of digits counts as integers (class indices), any other as class names.
Rows are produced one at a time, so the manifest's row limit stops the parse early.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator

from o2u_server.datasets.dataset import Allocate, DatasetLimits, LoadedDataset, invalid_dataset
from o2u_server.datasets.manifests import ManifestRow, load_manifest
from o2u_server.storage import Storage
from o2u_server.text import shown

__all__ = ["csv_rows", "load_csv_manifest"]


def load_csv_manifest(
    uri: str, storage: Storage, limits: DatasetLimits, field: str, allocate: Allocate
) -> LoadedDataset:
    return load_manifest(
        uri, storage, limits, field, allocate, parse_rows=csv_rows, digit_labels_are_indices=True
    )


def csv_rows(text: str, uri: str) -> Iterator[ManifestRow]:
    """The manifest's rows, labels as text (`load_manifest` turns all-digit labels into indices)."""
    where = shown(uri)
    reader = csv.reader(io.StringIO(text))
    try:
        header = [name.strip().lower() for name in next(reader, [])]
        if "key" not in header or "label" not in header:
            raise invalid_dataset(
                f"{where}: the first line must be a header naming the columns `key` and `label`"
            )
        key_column, label_column = header.index("key"), header.index("label")
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) <= max(key_column, label_column):
                raise invalid_dataset(
                    f"{where} line {reader.line_num}: expected columns {shown(', '.join(header), 120)}"
                )
            label = row[label_column].strip()
            if not label:
                raise invalid_dataset(f"{where} line {reader.line_num}: the label is empty")
            yield reader.line_num, row[key_column].strip(), label
    except csv.Error as error:
        raise invalid_dataset(f"{where} line {reader.line_num}: not valid CSV: {error}") from error
