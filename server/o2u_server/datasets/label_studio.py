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

The export is decoded one task at a time (`export_tasks`), and its rows are yielded as they are
found, so the sample limit stops a long export at its task max + 1 and memory holds the text, the
rows and one task's objects (`json.loads` of the whole export took about 6 times its size).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import Counter
from collections.abc import Iterator
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
    "SkippedTasks",
    "choose_label",
    "export_tasks",
    "label_studio_rows",
    "load_label_studio",
    "task_key",
]

_LOCAL_FILES = "/data/local-files/"
_WHITESPACE = re.compile(r"[ \t\n\r]*")  # JSON's insignificant whitespace
# what a JSON text that is not an array starts with
_JSON_VALUES = {"{": "an object", '"': "a string", "t": "true", "f": "false", "n": "null"}
_JSON_VALUES |= dict.fromkeys("-0123456789", "a number")
MAX_SKIPPED_KEYS = 10  # task ids kept per skip reason
SKIP_REASONS = {
    "NO_ANNOTATIONS": "the task has no annotations",
    "ALL_ANNOTATIONS_CANCELLED": "every annotation of the task was cancelled",
    "NO_CHOICES_RESULT": "no annotation of the task that is not cancelled has a choices result",
    "NO_IMAGE": "the task's image field is missing or names no image under the export's folder",
}


def _choices(annotation: dict[str, Any]) -> str | None:
    """The first choice of the annotation's first `choices` result; None when it has none (results
    of other shapes than Label Studio writes are no choice, not an error)."""
    results = annotation.get("result")
    for result in results if isinstance(results, list) else ():
        if isinstance(result, dict) and result.get("type") == "choices":
            value = result.get("value")
            choices = value.get("choices") if isinstance(value, dict) else None
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


def export_tasks(text: str, where: str) -> Iterator[object]:
    """The elements of the JSON array `text`, decoded one at a time: only the task being read is
    held as Python objects, not the whole export (which takes about 6 times its size as text)."""
    decoder = json.JSONDecoder()
    position = _skip_whitespace(text, 0)
    if not text.startswith("[", position):
        found = _JSON_VALUES.get(text[position : position + 1]) if position < len(text) else None
        if found is None:
            raise invalid_dataset(f"{where}: not valid JSON: expected '[' at {_place(text, position)}")
        raise invalid_dataset(f"{where}: expected a Label Studio JSON export (a list of tasks), not {found}")
    position = _skip_whitespace(text, position + 1)
    if text.startswith("]", position):
        position = _skip_whitespace(text, position + 1)
    else:
        while True:
            try:
                task, position = decoder.raw_decode(text, position)
            except (ValueError, RecursionError) as error:  # also too deep, or an integer of 4,300+ digits
                raise invalid_dataset(f"{where}: not valid JSON: {error}") from error
            yield task
            position = _skip_whitespace(text, position)
            if text.startswith("]", position):
                position = _skip_whitespace(text, position + 1)
                break
            if not text.startswith(",", position):
                raise invalid_dataset(
                    f"{where}: not valid JSON: expected ',' or ']' at {_place(text, position)}"
                )
            position = _skip_whitespace(text, position + 1)
    if position < len(text):
        raise invalid_dataset(
            f"{where}: not valid JSON: extra data after the list at {_place(text, position)}"
        )


def _skip_whitespace(text: str, position: int) -> int:
    match = _WHITESPACE.match(text, position)
    return match.end() if match else position


def _place(text: str, position: int) -> str:
    """'line L column C (char P)', as json's own errors name a place."""
    line = text.count("\n", 0, position) + 1
    column = position - text.rfind("\n", 0, position)
    return f"line {line} column {column} (char {position})"


def task_key(task: dict[str, Any], index: int) -> str:
    """A task's key in the dataset: its id, or its 1-based place in the export when it has none."""
    ident = task.get("id")
    return str(index) if ident is None else str(ident)


def label_studio_rows(
    text: str,
    uri: str,
    task_ids: dict[str, str],
    skipped: SkippedTasks,
    options: LabelStudioOptions | None = None,
) -> Iterator[ManifestRow]:
    """The manifest rows of the export's usable tasks; each skipped task goes to `skipped` with its
    reason, and each row's task id to `task_ids[image key]`."""
    options = options or LabelStudioOptions()
    image_field = options.image_field or DEFAULT_IMAGE_FIELD
    where = shown(uri)
    folder = uri.rsplit("/", 1)[0]
    task_at: dict[str, int] = {}  # the id of each usable task -> its place in the export
    for index, task in enumerate(export_tasks(text, where), start=1):
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise invalid_dataset(f"{where}: task {index} is not an object with a data object")
        task_id = task_key(task, index)
        image = task["data"].get(image_field)
        key = _relative(image, folder) if isinstance(image, str) and image else None
        label, reason = choose_label(task.get("annotations"), options.annotation_rule or "latest")
        if key is None or label is None:
            skipped.add(reason or "NO_IMAGE", task_id)
            continue
        if task_id in task_at:  # the ids are the dataset's keys: results must map back to one task
            raise invalid_dataset(
                f"{where}: task {index} has the id {shown(task_id, 80)!r} of task {task_at[task_id]}; "
                "task ids must be unique"
            )
        task_at[task_id] = index
        task_ids[key] = task_id
        yield index, key, label


class SkippedTasks:
    """The tasks skipped per SKIP_REASONS code: how many, and the first MAX_SKIPPED_KEYS ids (an
    export of millions of unusable tasks keeps ten ids per reason, not millions)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.first_ids: dict[str, list[str]] = {}

    def add(self, reason: str, task_id: str) -> None:
        self.counts[reason] += 1
        first = self.first_ids.setdefault(reason, [])
        if len(first) < MAX_SKIPPED_KEYS:
            first.append(task_id)

    def records(self) -> list[SkippedRecords]:
        """One entry per reason that skipped a task, in SKIP_REASONS order."""
        return [
            SkippedRecords(reason, SKIP_REASONS[reason], self.counts[reason], tuple(self.first_ids[reason]))
            for reason in SKIP_REASONS
            if self.counts[reason]
        ]


def load_label_studio(
    uri: str, storage: Storage, limits: DatasetLimits, field: str, options: DatasetOptions, allocate: Allocate
) -> LoadedDataset:
    task_ids: dict[str, str] = {}
    skipped = SkippedTasks()
    dataset = load_manifest(
        uri,
        storage,
        limits,
        field,
        allocate,
        parse_rows=lambda text, u: label_studio_rows(text, u, task_ids, skipped, options.label_studio),
    )
    return dataclasses.replace(
        dataset, keys=[task_ids[key] for key in dataset.keys], skipped=skipped.records()
    )
