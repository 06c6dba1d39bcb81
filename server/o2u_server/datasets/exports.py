"""Writing score rows as JSON Lines, CSV, Parquet (`parquet_export`) or Label Studio tasks
(`label_studio_export`) to a new `s3://` object or `file://` file under one of the server's export
locations (`export_uris`).

Rows are dictionaries of plain values (NumPy scalars are accepted). JSONL writes one compact JSON
object per row; CSV writes a header of the first row's keys (or the given columns) and one line per
row, with booleans as `true`/`false` and missing values empty; Parquet goes a row group at a time.
Every format is encoded as the rows come: into a temporary file beside the destination, then linked
into place, or into an object's multipart upload one part at a time (a Label Studio export first
gathers its suspects, by rank, to read their tasks' original data). Either way it appears complete
or not at all; an existing file or object is never replaced (ALREADY_EXISTS), so an export cannot
overwrite a dataset or anyone's earlier export.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Callable, Collection, Iterable, Sequence
from functools import partial
from typing import BinaryIO, TextIO

import numpy as np

from o2u_server.datasets.label_studio_export import original_data, suspected_rows, write_label_studio_tasks
from o2u_server.datasets.parquet_export import write_parquet
from o2u_server.domain import DatasetFormat, ExportFormat, Job
from o2u_server.errors import InvalidArgument
from o2u_server.storage import Storage
from o2u_server.text import shown

__all__ = ["EXPORT_COLUMNS", "infer_export_format", "provenance", "write_export"]

# The columns of an exported score, in file order (fields of domain.NoiseScoreRow).
EXPORT_COLUMNS = (
    "rank",
    "sample_id",
    "key",
    "score",
    "score_variance",
    "noise_probability",
    "suspected",
    "given_label",
    "given_label_name",
    "suggested_label",
    "suggested_label_name",
    "suggested_label_confidence",
)

# A Label Studio dataset read again for its tasks' original data is at most this large.
MAX_ORIGINALS_BYTES = 512 * 1024 * 1024

_SUFFIXES = {
    ExportFormat.JSONL: (".jsonl", ".ndjson"),
    ExportFormat.CSV: (".csv",),
    ExportFormat.PARQUET: (".parquet", ".pq"),
    ExportFormat.LABEL_STUDIO: (".json",),
}
_CONTENT_TYPES = {
    ExportFormat.JSONL: "application/x-ndjson",
    ExportFormat.CSV: "text/csv; charset=utf-8",
    ExportFormat.PARQUET: "application/vnd.apache.parquet",
    ExportFormat.LABEL_STUDIO: "application/json",
}


def infer_export_format(uri: str, *, field: str = "format") -> ExportFormat:
    """The export format a destination's extension implies (`.jsonl`/`.ndjson` or `.csv`)."""
    lowered = uri.lower()
    for export_format, suffixes in _SUFFIXES.items():
        if lowered.endswith(suffixes):
            return export_format
    raise InvalidArgument(
        f"cannot tell the export format from {shown(uri)!r}: set {field} or end the destination in .jsonl, "
        ".csv, .parquet or .json (Label Studio tasks)",
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


def _jsonl(rows: Iterable[dict[str, object]], buffer: TextIO, columns: Sequence[str] | None) -> int:
    count = 0
    for row in rows:
        buffer.write(json.dumps(row, default=_plain, ensure_ascii=False, separators=(",", ":")))
        buffer.write("\n")
        count += 1
    return count


def _csv(rows: Iterable[dict[str, object]], buffer: TextIO, columns: Sequence[str] | None) -> int:
    count = 0
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
    return count


_WRITERS = {ExportFormat.JSONL: _jsonl, ExportFormat.CSV: _csv}


def _originals(job: Job, storage: Storage, keys: Collection[str]) -> dict[str, dict[str, object]] | None:
    """A Label Studio dataset's tasks' data by id, of the tasks `keys` names, read again from the
    dataset (None for other formats)."""
    dataset_format = job.spec.dataset_format
    if dataset_format is None:
        from o2u_server.datasets import infer_format  # the package imports this module

        dataset_format = infer_format(job.spec.dataset_uri)
    if dataset_format is not DatasetFormat.LABEL_STUDIO:
        return None
    if not keys:
        return {}  # no suspect needs its task's data
    raw = storage.read_bytes(job.spec.dataset_uri, max_bytes=MAX_ORIGINALS_BYTES)
    try:
        return original_data(raw, keys)
    except (ValueError, InvalidArgument):
        return None  # the dataset changed since it was scored; tasks keep only o2u's fields


def provenance(job: Job) -> dict[str, str]:
    """What produced a job's scores, as a Parquet export's schema metadata records it: `o2u.job_id`,
    `o2u.dataset_uri` and `o2u.run_info` (the job's RunInfo as JSON: seed, versions, device, the
    resolved config, the dataset's digest)."""
    metadata = {"o2u.job_id": job.job_id, "o2u.dataset_uri": job.spec.dataset_uri}
    if job.run_info is not None:
        metadata["o2u.run_info"] = json.dumps(dataclasses.asdict(job.run_info), sort_keys=True)
    return metadata


def _text(encode: Callable[[TextIO], int]) -> Callable[[BinaryIO], int]:
    """`encode`, a writer of text, as a writer of its UTF-8 bytes."""

    def write(out: BinaryIO) -> int:
        text = io.TextIOWrapper(out, encoding="utf-8", newline="")
        count = encode(text)
        text.flush()
        text.detach()
        return count

    return write


def write_export(
    rows: Iterable[dict[str, object]],
    uri: str,
    export_format: ExportFormat,
    storage: Storage,
    *,
    field: str = "destination_uri",
    columns: Sequence[str] | None = None,
    job: Job | None = None,
) -> tuple[int, int]:
    """Write `rows` to `uri` as `export_format`; returns (rows written, bytes written)."""
    storage.parse_export(uri, field=field)  # refuse a bad destination before building the file
    encode: Callable[[BinaryIO], int]
    if export_format == ExportFormat.LABEL_STUDIO:
        if job is None:
            raise ValueError("a Label Studio export needs the job")
        suspects = suspected_rows(rows)
        originals = _originals(job, storage, {str(row["key"]) for row in suspects})
        encode = _text(lambda out: write_label_studio_tasks(suspects, job.job_id, job.spec, out, originals))
    elif export_format == ExportFormat.PARQUET:
        metadata = None if job is None else provenance(job)
        encode = partial(write_parquet, rows, columns or EXPORT_COLUMNS, metadata=metadata)
    else:
        writer = _WRITERS[export_format]
        encode = _text(lambda out: writer(rows, out, columns))
    # Encoded as the rows come, into the file being written or the part of the object being filled
    # (nothing more is held in memory): a whole file in memory, and its encoded copy, held it two to
    # three times over.
    counted: list[int] = []
    written = storage.create_export(
        uri, lambda out: counted.append(encode(out)), field=field, content_type=_CONTENT_TYPES[export_format]
    )
    return counted[0], written
