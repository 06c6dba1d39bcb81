"""Score rows as a Parquet file: one typed column per field (int64, float64, bool, string), in
the export's column order, written with zstd compression into memory (the caller stores it in one
call, as the other exports)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["parquet_export"]

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


def parquet_export(rows: Iterable[dict[str, object]], columns: Sequence[str]) -> tuple[int, bytes]:
    """(rows written, the Parquet file's bytes) of `rows` restricted to `columns`."""
    values: dict[str, list[object]] = {name: [] for name in columns}
    count = 0
    for row in rows:
        for name in columns:
            values[name].append(_plain(row.get(name)))
        count += 1
    schema = pa.schema([(name, _TYPES.get(name, pa.string())) for name in columns])
    table = pa.Table.from_pydict(values, schema=schema)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return count, sink.getvalue().to_pybytes()
