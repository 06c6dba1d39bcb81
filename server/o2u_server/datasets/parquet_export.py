"""Score rows as a Parquet file: one typed column per field (int64, float64, bool, string), in
the export's column order, zstd-compressed, written as the rows come: one row group of
`ROW_GROUP_ROWS` rows at a time, so only that group is held in memory. The schema's key-value
metadata can say what produced the scores (`exports.provenance`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from itertools import islice
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["ROW_GROUP_ROWS", "write_parquet"]

# Rows per row group: enough for good compression and a small footer (153 groups at 5M rows), few
# enough that a group's columns, as Python values, take about an upload part (14 MB of scores).
ROW_GROUP_ROWS = 32_768

_TYPES = {
    "rank": pa.int64(),
    "sample_id": pa.int64(),
    "key": pa.string(),
    "score": pa.float64(),
    "score_variance": pa.float64(),
    "noise_probability": pa.float64(),
    "suspected": pa.bool_(),
    "given_label": pa.int64(),
    "given_label_name": pa.string(),
    "suggested_label": pa.int64(),
    "suggested_label_name": pa.string(),
    "suggested_label_confidence": pa.float64(),
}


def _plain(value: object) -> object:
    return value.item() if isinstance(value, np.generic) else value


def write_parquet(
    rows: Iterable[dict[str, object]],
    columns: Sequence[str],
    out: BinaryIO,
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Write `rows`, restricted to `columns`, to `out` as a Parquet file whose schema carries
    `metadata` (key-value pairs: what produced the scores); returns the rows written. `out` needs
    only `write` (an upload's parts, a new file); it is left open."""
    fields = [(name, _TYPES.get(name, pa.string())) for name in columns]
    schema = pa.schema(fields, metadata=dict(metadata) if metadata else None)
    count = 0
    remaining = iter(rows)
    with pq.ParquetWriter(out, schema, compression="zstd") as writer:
        while True:
            values: dict[str, list[object]] = {name: [] for name in columns}
            taken = 0
            for row in islice(remaining, ROW_GROUP_ROWS):  # a group's columns, not its rows, are held
                for name in columns:
                    values[name].append(_plain(row.get(name)))
                taken += 1
            if not taken:
                return count
            writer.write_table(pa.Table.from_pydict(values, schema=schema))
            count += taken
