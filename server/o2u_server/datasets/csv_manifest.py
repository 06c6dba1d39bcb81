"""The CSV manifest format: a `key,label` header (other columns are ignored), one sample per row.

Keys are paths relative to the manifest's folder (`datasets.manifests` checks and locates them). A
label column made only of digits counts as integers (class indices), any other as class names.
"""

from __future__ import annotations

import csv
import io
import re

from o2u_server.datasets.dataset import DatasetLimits, LoadedDataset, invalid_dataset
from o2u_server.datasets.manifests import ManifestRow, load_manifest
from o2u_server.storage import Storage

__all__ = ["csv_rows", "load_csv_manifest"]

_DIGITS = re.compile(r"^[0-9]+$")


def load_csv_manifest(uri: str, storage: Storage, limits: DatasetLimits, field: str) -> LoadedDataset:
    return load_manifest(uri, storage, limits, field, parse_rows=csv_rows)


def csv_rows(text: str, uri: str) -> list[ManifestRow]:
    """The manifest's rows; labels are all integers when every one is made of digits."""
    reader = csv.reader(io.StringIO(text))
    try:
        header = [name.strip().lower() for name in next(reader, [])]
        if "key" not in header or "label" not in header:
            raise invalid_dataset(
                f"{uri}: the first line must be a header naming the columns `key` and `label`"
            )
        key_column, label_column = header.index("key"), header.index("label")
        rows: list[tuple[int, str, str]] = []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) <= max(key_column, label_column):
                raise invalid_dataset(f"{uri} line {reader.line_num}: expected columns {', '.join(header)}")
            label = row[label_column].strip()
            if not label:
                raise invalid_dataset(f"{uri} line {reader.line_num}: the label is empty")
            rows.append((reader.line_num, row[key_column].strip(), label))
    except csv.Error as error:
        raise invalid_dataset(f"{uri} line {reader.line_num}: not valid CSV: {error}") from error
    if all(_DIGITS.match(label) for _, _, label in rows):
        return [(line, key, int(label)) for line, key, label in rows]
    return list(rows)
