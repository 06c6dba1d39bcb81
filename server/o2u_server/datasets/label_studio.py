"""The Label Studio format: a Label Studio JSON export (a list of tasks) as a manifest of images.

Each task's `data.image` names its image: a path relative to the export's folder, Label Studio's
local-files form `/data/local-files/?d=<path>` (the path taken relative to the export's folder), or
a URI under the export's folder (`s3://bucket/<folder>/...`, `file:///<folder>/...`). The label is
the `choices` of one annotation: cancelled annotations (`was_cancelled`) and those without a
`choices` result are ignored, and of the rest the latest counts (`updated_at`, else `created_at`,
else the last listed; `choose_label(..., rule="majority")` takes the most frequent label instead,
ties to the latest). Tasks with no usable annotation or no image are skipped; the loaded
dataset's keys are the task ids, so results map back to the tasks. The images are then read as a
CSV or JSONL manifest's are (`manifests.load_manifest`).
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from o2u_server.datasets.dataset import DatasetLimits, LoadedDataset, invalid_dataset
from o2u_server.datasets.manifests import ManifestRow, load_manifest
from o2u_server.storage import Storage
from o2u_server.text import shown

__all__ = ["IMAGE_FIELD", "choose_label", "label_studio_rows", "load_label_studio"]

IMAGE_FIELD = "image"
_LOCAL_FILES = "/data/local-files/"


def _choices(annotation: dict[str, Any]) -> str | None:
    for result in annotation.get("result") or []:
        if isinstance(result, dict) and result.get("type") == "choices":
            choices = (result.get("value") or {}).get("choices")
            if isinstance(choices, list) and choices and isinstance(choices[0], str) and choices[0]:
                return choices[0]
    return None


def choose_label(annotations: object, rule: str = "latest") -> tuple[str | None, str]:
    """(the label that counts, or None and why): `latest` or `majority` of the usable annotations."""
    if not isinstance(annotations, list) or not annotations:
        return None, "no annotations"
    usable = [
        (str(a.get("updated_at") or a.get("created_at") or ""), index, label)
        for index, a in enumerate(annotations)
        if isinstance(a, dict) and not a.get("was_cancelled") and (label := _choices(a)) is not None
    ]
    if not usable:
        cancelled = all(isinstance(a, dict) and a.get("was_cancelled") for a in annotations)
        return None, "every annotation was cancelled" if cancelled else "no annotation has a choices result"
    usable.sort()
    if rule == "majority":
        counts = Counter(label for _, _, label in usable)
        best = max(counts.values())
        return next(label for _, _, label in reversed(usable) if counts[label] == best), ""
    return usable[-1][2], ""


def _relative(image: str, folder: str) -> str | None:
    if image.startswith(_LOCAL_FILES):
        values = parse_qs(urlparse(image).query).get("d")
        return values[0] if values else None
    if "://" in image:
        prefix = folder.rstrip("/") + "/"
        return unquote(image[len(prefix) :]) if image.startswith(prefix) else None
    return image


def label_studio_rows(
    text: str, uri: str, task_ids: dict[str, str], skipped: list[str]
) -> Iterator[ManifestRow]:
    where = shown(uri)
    try:
        tasks = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise invalid_dataset(f"{where}: not valid JSON: {error}") from error
    if not isinstance(tasks, list):
        raise invalid_dataset(f"{where}: expected a Label Studio JSON export (a list of tasks)")
    folder = uri.rsplit("/", 1)[0]
    for index, task in enumerate(tasks, start=1):
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise invalid_dataset(f"{where}: task {index} is not an object with a data object")
        task_id = str(task.get("id", index))
        image = task["data"].get(IMAGE_FIELD)
        key = _relative(image, folder) if isinstance(image, str) and image else None
        label, why = choose_label(task.get("annotations"))
        if key is None or label is None:
            skipped.append(
                f"task {task_id}: {why or f'data.{IMAGE_FIELD} is not an image under the export folder'}"
            )
            continue
        task_ids[key] = task_id
        yield index, key, label


def load_label_studio(uri: str, storage: Storage, limits: DatasetLimits, field: str) -> LoadedDataset:
    task_ids: dict[str, str] = {}
    skipped: list[str] = []
    dataset = load_manifest(
        uri, storage, limits, field, parse_rows=lambda text, u: label_studio_rows(text, u, task_ids, skipped)
    )
    return dataclasses.replace(dataset, keys=[task_ids[key] for key in dataset.keys])
