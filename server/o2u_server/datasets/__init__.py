"""Datasets named by URI, loaded into the arrays the engine scores, within the server's limits.

`FORMATS` is the one table of dataset formats: per `DatasetFormat`, the URI endings that imply it,
whether the URI names a folder (a key prefix) rather than one object, and its loader - one module
per format (`npz`, `image_folder`, `csv_manifest`, `jsonl_manifest`, `parquet`, `label_studio`).
Nothing outside the table compares format names. Every limit is checked as early as the information
exists: object sizes from the listing or stat before anything is downloaded (`max_dataset_bytes`),
the sample count from the `.npz` header or the manifest/listing (`max_samples`), image dimensions
from each header before decoding (`max_image_pixels`), the class count before any per-class list
(`max_classes`), decoded sizes from headers before inflating or decoding (`max_decoded_bytes`).
`load_dataset` then checks what every format returns (`dataset.check_loaded`) and records its
content digest. A job's DatasetOptions reach the loader of their format only (`datasets.options`
checks them at submit: `check_dataset_options`). Errors are the service's classes and name the URI
(as the caller sent it), key, field, option or limit at fault. Exports of score rows (JSONL, CSV)
are `datasets.exports`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from o2u_server.datasets.csv_manifest import load_csv_manifest
from o2u_server.datasets.dataset import (
    Allocate,
    DatasetLimits,
    LoadedDataset,
    Loader,
    PlainLoader,
    check_loaded,
    content_digest,
)
from o2u_server.datasets.image_folder import load_image_folder
from o2u_server.datasets.jsonl_manifest import load_jsonl_manifest
from o2u_server.datasets.label_studio import load_label_studio
from o2u_server.datasets.npz import load_npz
from o2u_server.datasets.options import check_dataset_options as check_options
from o2u_server.datasets.parquet import load_parquet
from o2u_server.domain import DatasetFormat, DatasetOptions
from o2u_server.errors import NotFound
from o2u_server.storage import Storage
from o2u_server.text import shown

__all__ = [
    "FOLDER_FORMAT",
    "FORMATS",
    "Allocate",
    "DatasetLimits",
    "FormatSpec",
    "LoadedDataset",
    "check_dataset_exists",
    "check_dataset_options",
    "check_dataset_uri",
    "infer_format",
    "load_dataset",
]


@dataclass(frozen=True)
class FormatSpec:
    suffixes: tuple[str, ...]  # lower-case endings of a URI that imply the format
    prefix: bool  # the URI names a folder (an object-store key prefix), not one object
    load: Loader


def _without_options(load: PlainLoader) -> Loader:
    """The loader of a format that has no options (`check_dataset_options` refuses any for it)."""
    return lambda uri, storage, limits, field, _options, allocate: load(uri, storage, limits, field, allocate)


FORMATS: dict[DatasetFormat, FormatSpec] = {
    DatasetFormat.NPZ: FormatSpec((".npz",), prefix=False, load=_without_options(load_npz)),
    DatasetFormat.IMAGE_FOLDER: FormatSpec((), prefix=True, load=_without_options(load_image_folder)),
    DatasetFormat.CSV_MANIFEST: FormatSpec((".csv",), prefix=False, load=_without_options(load_csv_manifest)),
    DatasetFormat.JSONL_MANIFEST: FormatSpec(
        (".jsonl", ".ndjson"), prefix=False, load=_without_options(load_jsonl_manifest)
    ),
    DatasetFormat.PARQUET: FormatSpec((".parquet", ".pq"), prefix=False, load=load_parquet),
    DatasetFormat.LABEL_STUDIO: FormatSpec((".json",), prefix=False, load=load_label_studio),
}
FOLDER_FORMAT = DatasetFormat.IMAGE_FOLDER  # what a URI with none of the suffixes names


def infer_format(uri: str) -> DatasetFormat:
    """The format a URI's ending implies (see FORMATS), else a folder: FOLDER_FORMAT."""
    path = uri.split("://", 1)[-1].rstrip("/").lower()
    for dataset_format, spec in FORMATS.items():
        if spec.suffixes and path.endswith(spec.suffixes):
            return dataset_format
    return FOLDER_FORMAT


def _spec(uri: str, dataset_format: DatasetFormat | None) -> FormatSpec:
    return FORMATS[dataset_format or infer_format(uri)]


def check_dataset_uri(
    uri: str, dataset_format: DatasetFormat | None, storage: Storage, *, field: str = "dataset.uri"
) -> None:
    """InvalidArgument or PermissionDenied if the URI is malformed or not allowed; reads nothing."""
    storage.parse(uri, field=field, allow_prefix=_spec(uri, dataset_format).prefix)


def check_dataset_options(
    uri: str, dataset_format: DatasetFormat | None, options: DatasetOptions | None
) -> None:
    """InvalidArgument naming the option when `options` do not suit the dataset's format (given, or
    inferred from the URI) or cannot work together; reads nothing."""
    check_options(options, dataset_format or infer_format(uri))


def check_dataset_exists(
    uri: str, dataset_format: DatasetFormat | None, storage: Storage, *, field: str = "dataset.uri"
) -> None:
    """NotFound unless the dataset is there: one stat, or the first page of a folder's listing."""
    if not _spec(uri, dataset_format).prefix:
        storage.stat(uri, field=field)
        return
    objects = storage.iter_objects(uri, field=field)
    first = next(objects, None)
    getattr(objects, "close", lambda: None)()  # end the listing after its first entry
    if first is None:
        raise NotFound(
            f"{field} {shown(uri)!r} names a folder with no files in it",
            reason="DATASET_NOT_FOUND",
            field=field,
            resource_type="object",
            resource_name=shown(uri),
        )


def load_dataset(
    uri: str,
    dataset_format: DatasetFormat | None,
    storage: Storage,
    limits: DatasetLimits,
    *,
    options: DatasetOptions | None = None,
    field: str = "dataset.uri",
    allocate: Allocate = np.empty,
) -> LoadedDataset:
    """Read, check and decode the dataset at `uri` (`dataset_format` None: inferred from the URI)
    as `options` say (None: the format's defaults), with its content digest set. Images, parquet
    embeddings and a local .npz's `x` are decoded into an array from `allocate`.

    Raises InvalidArgument, PermissionDenied, NotFound, ResourceExhausted (limits) or Unavailable,
    and storage.Stopped when the storage's job is asked to stop.
    """
    spec = _spec(uri, dataset_format)
    reference = storage.parse(uri, field=field, allow_prefix=spec.prefix)
    dataset = spec.load(uri, storage, limits, field, options or DatasetOptions(), allocate)
    dataset.source = reference.scheme
    check_loaded(dataset, uri, limits)
    dataset.digest = content_digest(dataset, storage.reads.check)
    return dataset
