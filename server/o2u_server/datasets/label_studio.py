"""The Label Studio format: a Label Studio JSON export (a list of tasks) as a manifest of images.

Each task's `data.image` (or the `image_field` of the job's LabelStudioOptions) names its image: a
path relative to the export's folder, Label Studio's
local-files form `/data/local-files/?d=<path>` (the path taken relative to the export's folder), or
a URI under the export's folder (`s3://bucket/<folder>/...`, `file:///<folder>/...`). The label is
the `choices` of one annotation: cancelled annotations (`was_cancelled`) and those without a
`choices` result are ignored, and of the rest the latest counts (`updated_at`, else `created_at`,
else the last listed), or with the option `annotation_rule: majority` the most frequent label
(ties to the latest of the tied). Tasks with no usable annotation or no image are skipped and
counted per reason (`SKIP_REASONS`) with their first task ids, which the job reports in its run
info; the loaded dataset's keys are the task ids, so results map back to the tasks. The images are
then read as a CSV or JSONL manifest's are (`manifests.load_manifest`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from o2u_server.datasets.dataset import Allocate, DatasetLimits, LoadedDataset, invalid_dataset
from o2u_server.datasets.manifests import ManifestRow, load_manifest
from o2u_server.datasets.options import DEFAULT_IMAGE_FIELD
from o2u_server.domain import DatasetOptions, LabelStudioOptions, SkippedRecords
from o2u_server.storage import Storage
from o2u_server.text import shown

__all__ = [
    "MAX_SKIPPED_KEYS",
    "SKIP_REASONS",
    "choose_label",
    "label_studio_rows",
    "load_label_studio",
    "skipped_records",
]

_LOCAL_FILES = "/data/local-files/"
MAX_SKIPPED_KEYS = 10  # task ids kept per skip reason
SKIP_REASONS = {
    "NO_ANNOTATIONS": "the task has no annotations",
    "ALL_ANNOTATIONS_CANCELLED": "every annotation of the task was cancelled",
    "NO_CHOICES_RESULT": "no annotation of the task that is not cancelled has a choices result",
    "NO_IMAGE": "the task's image field is missing or names no image under the export's folder",
}


def _choices(annotation: dict[str, Any]) -> str | None:
    for result in annotation.get("result") or []:
        if isinstance(result, dict) and result.get("type") == "choices":
            choices = (result.get("value") or {}).get("choices")
            if isinstance(choices, list) and choices and isinstance(choices[0], str) and choices[0]:
                return choices[0]
    return None


def _timestamp(value: object) -> float:
    """Seconds since the epoch of an ISO 8601 time as Label Studio writes it (with or without
    fractional seconds, `Z` or an offset; naive times taken as UTC); -inf when absent or not a
    time, so such annotations count as the oldest."""
    if not isinstance(value, str) or not value:
        return -math.inf
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return -math.inf
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def choose_label(annotations: object, rule: str = "latest") -> tuple[str | None, str]:
    """(the label that counts, "") or (None, the SKIP_REASONS code): `latest` or `majority` of the
    annotations that are not cancelled and have a choices result."""
    if not isinstance(annotations, list) or not annotations:
        return None, "NO_ANNOTATIONS"
    usable = [
        (_timestamp(a.get("updated_at") or a.get("created_at")), index, label)
        for index, a in enumerate(annotations)
        if isinstance(a, dict) and not a.get("was_cancelled") and (label := _choices(a)) is not None
    ]
    if not usable:
        cancelled = all(isinstance(a, dict) and a.get("was_cancelled") for a in annotations)
        return None, "ALL_ANNOTATIONS_CANCELLED" if cancelled else "NO_CHOICES_RESULT"
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
    text: str,
    uri: str,
    task_ids: dict[str, str],
    skipped: dict[str, list[str]],
    options: LabelStudioOptions | None = None,
) -> Iterator[ManifestRow]:
    """The manifest rows of the export's usable tasks; each skipped task's id goes to
    `skipped[reason]`, and each row's task id to `task_ids[image key]`."""
    options = options or LabelStudioOptions()
    image_field = options.image_field or DEFAULT_IMAGE_FIELD
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
        image = task["data"].get(image_field)
        key = _relative(image, folder) if isinstance(image, str) and image else None
        label, reason = choose_label(task.get("annotations"), options.annotation_rule or "latest")
        if key is None or label is None:
            skipped.setdefault(reason or "NO_IMAGE", []).append(task_id)
            continue
        task_ids[key] = task_id
        yield index, key, label


def skipped_records(skipped: Mapping[str, Sequence[str]]) -> list[SkippedRecords]:
    """One entry per reason, in SKIP_REASONS order, with the first MAX_SKIPPED_KEYS task ids."""
    return [
        SkippedRecords(
            reason, SKIP_REASONS[reason], len(skipped[reason]), tuple(skipped[reason][:MAX_SKIPPED_KEYS])
        )
        for reason in SKIP_REASONS
        if skipped.get(reason)
    ]


def load_label_studio(
    uri: str, storage: Storage, limits: DatasetLimits, field: str, options: DatasetOptions, allocate: Allocate
) -> LoadedDataset:
    task_ids: dict[str, str] = {}
    skipped: dict[str, list[str]] = {}
    dataset = load_manifest(
        uri,
        storage,
        limits,
        field,
        allocate,
        parse_rows=lambda text, u: label_studio_rows(text, u, task_ids, skipped, options.label_studio),
    )
    return dataclasses.replace(
        dataset, keys=[task_ids[key] for key in dataset.keys], skipped=skipped_records(skipped)
    )
