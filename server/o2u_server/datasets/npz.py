"""The `.npz` format: a NumPy archive with `x` (images (N,H,W[,C]) or feature vectors (N,D)), `y`
(labels) and optional `ids` (sample keys) and `class_names`.

The size comes from the file's stat or the object's listing before anything is downloaded, the sample
count, image size and decoded size from the `.npy` headers before any array is loaded or inflated
(`npz_archive`), the class count before any list of class names is built (`labels`). A local file is
read into owned memory (never mapped); an object is downloaded into one buffer that the arrays
view in place.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np

from o2u_server.datasets.dataset import (
    Allocate,
    DatasetLimits,
    LoadedDataset,
    empty_dataset,
    invalid_dataset,
    too_large,
    too_many_classes,
    too_many_samples,
    too_much_decoded,
)
from o2u_server.datasets.labels import encode_labels
from o2u_server.datasets.npz_archive import NpzArchive, NpzMember
from o2u_server.errors import ResourceExhausted
from o2u_server.storage import Storage
from o2u_server.text import shown

__all__ = ["load_npz"]


def load_npz(
    uri: str, storage: Storage, limits: DatasetLimits, field: str, allocate: Allocate
) -> LoadedDataset:
    handle = storage.open_local(uri, field=field)
    source: io.BufferedIOBase | bytearray
    if handle is not None:
        size = os.fstat(handle.fileno()).st_size
        if size > limits.max_bytes:
            handle.close()
            raise too_large(shown(uri), size, limits)
        source = handle
    else:
        size = storage.stat(uri, field=field).size
        if size > limits.max_bytes:
            raise too_large(shown(uri), size, limits)
        source = storage.read_buffer(uri, field=field, max_bytes=limits.max_bytes)
    where = shown(uri)
    with NpzArchive(source, uri=uri, field=field, reads=storage.reads) as archive:
        count = _check_members(where, archive.members, limits)
        class_names = None
        if "class_names" in archive.members:
            class_names = _strings(archive.load("class_names"), uri=where, name="class_names")
        labels, names = encode_labels(archive.load("y"), class_names=class_names, where=where, limits=limits)
        keys = _strings(archive.load("ids"), uri=where, name="ids") if "ids" in archive.members else None
        if keys is not None and len(set(keys)) != len(keys):
            raise invalid_dataset(f"{where}: ids must be unique")
        features = archive.load("x", allocate)
    if handle is not None:
        storage.reads.add(0, files=1)  # a download counted itself
    return LoadedDataset(
        features=features,
        labels=labels,
        keys=keys if keys is not None else [str(i) for i in range(count)],
        class_names=names,
        bytes_read=size,
        source="file",
        files_read=1,
    )


def _check_members(uri: str, members: dict[str, NpzMember], limits: DatasetLimits) -> int:
    """The sample count, once the headers show the arrays are there, agree and fit the limits."""
    missing = [name for name in ("x", "y") if name not in members]
    if missing:
        raise invalid_dataset(
            f"{uri} lacks the array(s) {', '.join(missing)}; it holds "
            f"{', '.join(sorted(members)) or 'none'} "
            "(expected x: images or features, y: labels, optional ids and class_names)"
        )
    x = members["x"]
    count = x.shape[0] if x.shape else 0
    if count > limits.max_samples:
        raise too_many_samples(uri, count, limits)
    if count == 0:
        raise empty_dataset(uri, "x has no rows")
    if x.dtype.kind not in "biuf" or len(x.shape) not in (2, 3, 4):
        raise invalid_dataset(
            f"{uri}: x must be numbers shaped (N,D) features or (N,H,W[,C]) images, got {x.dtype} {x.shape}"
        )
    _check_pixels(uri, x.shape, limits)
    for name in ("y", "ids"):
        if name in members and members[name].shape != (count,):
            raise invalid_dataset(
                f"{uri}: {name} must have shape ({count},) to match x, got {members[name].shape}"
            )
    names = members["class_names"].shape if "class_names" in members else ()
    if len(names) == 1 and names[0] > limits.max_classes:
        raise too_many_classes(uri, names[0], limits, " (in class_names)")
    decoded = sum(member.nbytes for member in members.values())
    if decoded > limits.max_decoded_bytes:
        raise too_much_decoded(f"{uri} (its arrays, decoded)", decoded, limits)
    return count


def _check_pixels(uri: str, shape: tuple[int, ...], limits: DatasetLimits) -> None:
    if len(shape) == 2:
        return
    # (N,H,W), (N,H,W,C) or (N,C,H,W): the two largest of the last three axes are the image plane.
    height, width = sorted(shape[1:])[-2:] if len(shape) == 4 else shape[1:]
    if height * width > limits.max_image_pixels:
        raise ResourceExhausted(
            f"{uri}: images of {height}x{width} pixels exceed max_image_pixels (O2U_MAX_IMAGE_PIXELS) = "
            f"{limits.max_image_pixels}",
            reason="IMAGE_TOO_LARGE",
            metadata={"limit": "max_image_pixels"},
        )


def _strings(values: np.ndarray[Any, Any], *, uri: str, name: str) -> list[str]:
    if values.ndim != 1 or values.dtype.kind not in "USiu":
        raise invalid_dataset(
            f"{uri}: {name} must be a 1-D array of strings or integers, got {values.dtype} {values.shape}"
        )
    if values.dtype.kind == "S":
        return [value.decode("utf-8", "replace") for value in values.tolist()]
    return [str(value) for value in values.tolist()]
