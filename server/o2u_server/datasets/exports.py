"""Writing score rows as JSON Lines or CSV to an `s3://` object or a `file://` path under a data root.

Rows are dictionaries of plain values (NumPy scalars are accepted). JSONL writes one compact JSON
object per row; CSV writes a header of the first row's keys (or the given columns) and one line per
row, with booleans as `true`/`false` and missing values empty. The whole file is built in memory and
written in one call, so a file destination is replaced atomically and an object appears complete.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np

from o2u_server.errors import InvalidArgument
from o2u_server.storage import Storage

__all__ = ["infer_export_format", "write_export"]

_CONTENT_TYPES = {"jsonl": "application/x-ndjson", "csv": "text/csv; charset=utf-8"}


def infer_export_format(uri: str, *, field: str = "format") -> Literal["jsonl", "csv"]:
    """The export format a destination's extension implies (`.jsonl`/`.ndjson` or `.csv`)."""
    lowered = uri.lower()
    if lowered.endswith(".csv"):
        return "csv"
    if lowered.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    raise InvalidArgument(
        f"cannot tell the export format from {uri!r}: set {field} or end the destination in .jsonl or .csv",
        reason="INVALID_FORMAT",
        field=field,
    )


def _plain(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot export a value of type {type(value).__name__}")


def _csv_cell(value: object) -> object:
    value = _plain(value) if isinstance(value, np.generic | np.ndarray) else value
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, default=_plain, separators=(",", ":"))
    return value


def write_export(
    rows: Iterable[dict[str, object]],
    uri: str,
    fmt: Literal["jsonl", "csv"],
    storage: Storage,
    *,
    field: str = "destination_uri",
    columns: Sequence[str] | None = None,
) -> tuple[int, int]:
    """Write `rows` to `uri` as `fmt`; returns (rows written, bytes written)."""
    if fmt not in _CONTENT_TYPES:
        raise InvalidArgument(
            f"export format {fmt!r} is not jsonl or csv", reason="INVALID_FORMAT", field="format"
        )
    storage.parse(uri, field=field)  # refuse a bad destination before building the file
    buffer = io.StringIO()
    count = 0
    if fmt == "jsonl":
        for row in rows:
            buffer.write(json.dumps(row, default=_plain, ensure_ascii=False, separators=(",", ":")))
            buffer.write("\n")
            count += 1
    else:
        writer: csv.DictWriter[str] | None = None
        if columns is not None:
            writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
            writer.writeheader()
        for row in rows:
            if writer is None:
                writer = csv.DictWriter(buffer, fieldnames=list(row), lineterminator="\n")
                writer.writeheader()
            writer.writerow({name: _csv_cell(value) for name, value in row.items()})
            count += 1
    data = buffer.getvalue().encode("utf-8")
    written = storage.write_bytes(uri, data, field=field, content_type=_CONTENT_TYPES[fmt])
    return count, written
