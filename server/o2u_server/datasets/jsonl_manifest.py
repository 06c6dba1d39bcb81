"""The JSON Lines manifest format: one object `{"key": "<path>", "label": ...}` per line.

Keys are paths relative to the manifest's folder (`datasets.manifests` checks and locates them).
Labels are JSON integers (class indices) or non-empty strings (class names), one type for the file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from o2u_server.datasets.dataset import Allocate, DatasetLimits, LoadedDataset, invalid_dataset
from o2u_server.datasets.manifests import ManifestRow, load_manifest
from o2u_server.storage import Storage
from o2u_server.text import shown

__all__ = ["jsonl_rows", "load_jsonl_manifest"]


def load_jsonl_manifest(
    uri: str, storage: Storage, limits: DatasetLimits, field: str, allocate: Allocate
) -> LoadedDataset:
    return load_manifest(uri, storage, limits, field, allocate, parse_rows=jsonl_rows)


def jsonl_rows(text: str, uri: str) -> Iterator[ManifestRow]:
    """The manifest's rows, one parsed line at a time."""
    where = shown(uri)
    for line_number, line in enumerate(_lines(text), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as error:  # also too deep, or an integer of 4,300+ digits
            raise invalid_dataset(f"{where} line {line_number}: not valid JSON: {error}") from error
        if not isinstance(record, dict) or not isinstance(record.get("key"), str):
            raise invalid_dataset(
                f'{where} line {line_number}: expected an object {{"key": "<path>", "label": ...}}'
            )
        label = record.get("label")
        if isinstance(label, bool) or not isinstance(label, int | str) or label == "":
            raise invalid_dataset(
                f"{where} line {line_number}: label must be an integer or a non-empty string"
            )
        yield line_number, record["key"], label


def _lines(text: str) -> Iterator[str]:
    """The lines of `text` one by one (str.splitlines would build the whole list first)."""
    start = 0
    while start < len(text):
        end = text.find("\n", start)
        if end < 0:
            end = len(text)
        yield text[start:end].rstrip("\r")
        start = end + 1
