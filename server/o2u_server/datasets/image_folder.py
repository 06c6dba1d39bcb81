"""The image-folder format: `<prefix>/<class>/<file>.png|jpg|jpeg`, classes sorted by name.

The URI names a folder (an object-store key prefix), listed once: files beside the class folders
(a README, a manifest) and hidden files are skipped, and the sample count and total size are checked
while the listing arrives, before any image is downloaded. Images are then read and decoded by
`datasets.images`.
"""

from __future__ import annotations

import numpy as np

from o2u_server.datasets.dataset import (
    MAX_KEY_CHARS,
    Allocate,
    DatasetLimits,
    LoadedDataset,
    empty_dataset,
    invalid_dataset,
    too_large,
    too_many_classes,
    too_many_samples,
)
from o2u_server.datasets.images import ImageItem, load_images
from o2u_server.storage import Storage
from o2u_server.text import shown, text_problem

__all__ = ["IMAGE_EXTENSIONS", "load_image_folder"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def load_image_folder(
    uri: str, storage: Storage, limits: DatasetLimits, field: str, allocate: Allocate
) -> LoadedDataset:
    prefix = uri if uri.endswith("/") else uri + "/"
    found: list[tuple[str, ImageItem]] = []
    total_bytes = 0
    for info in storage.iter_objects(prefix, field=field):
        parts = info.relative_key.split("/")
        if len(parts) < 2 or any(part.startswith(".") for part in parts):
            continue  # files beside the class folders (README, manifests) and hidden files
        if not info.relative_key.lower().endswith(IMAGE_EXTENSIONS):
            continue
        problem = text_problem(info.relative_key, max_chars=MAX_KEY_CHARS)
        if problem is not None:
            raise invalid_dataset(f"{shown(uri)}: the file name {shown(info.relative_key, 80)!r} {problem}")
        found.append((parts[0], ImageItem(info, info.relative_key)))
        total_bytes += info.size
        if len(found) > limits.max_samples:
            raise too_many_samples(shown(uri), len(found), limits)
        if total_bytes > limits.max_bytes:
            raise too_large(shown(uri), total_bytes, limits)
    if not found:
        raise empty_dataset(shown(uri), "expected <folder>/<class>/<file>.png|jpg|jpeg")
    found.sort(key=lambda entry: (entry[0], entry[1].key))
    class_names = sorted({name for name, _ in found})
    if len(class_names) > limits.max_classes:
        raise too_many_classes(shown(uri), len(class_names), limits, " (class folders)")
    labels = np.searchsorted(np.array(class_names), np.array([name for name, _ in found])).astype(np.int64)
    items = [item for _, item in found]
    images, bytes_read = load_images(
        items,
        storage,
        field=field,
        max_pixels=limits.max_image_pixels,
        max_decoded_bytes=limits.max_decoded_bytes,
        allocate=allocate,
    )
    keys = [item.key for item in items]
    return LoadedDataset(images, labels, keys, class_names, bytes_read, "file", files_read=len(items))
