"""Suspects as Label Studio review tasks with pre-annotations (Label Studio's JSON task import).

One task per suspected sample, most suspicious first: `data` holds the original data (`image`: the
sample's object or file, when the dataset lists files: a folder's or manifest's key resolved
against the dataset's URI; the `o2u_*` fields: key, sample id, rank, noise score and probability),
for a Label Studio dataset, the task's own `data` as exported (keys are task ids);
`annotations` the given label as a `choices` result to check, and `predictions` one entry with the
suggested label (`result`), our confidence in it (`score`: its mean softmax probability over the
cyclic epochs) and `model_version` = the job id. The result names `from_name` `label` and
`to_name` `image`, the names of the labeling config `docs/pipelines.md` gives. Non-suspected rows
are left out.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping
from typing import TextIO

from o2u_server.datasets.label_studio import export_tasks, task_key
from o2u_server.domain import DatasetFormat, JobSpec

__all__ = ["FROM_NAME", "TO_NAME", "original_data", "suspected_rows", "write_label_studio_tasks"]

FROM_NAME = "label"
TO_NAME = "image"
_FOLDER_FORMATS = (DatasetFormat.IMAGE_FOLDER,)
_MANIFEST_FORMATS = (DatasetFormat.CSV_MANIFEST, DatasetFormat.JSONL_MANIFEST)


def _image_uri(spec: JobSpec, key: str) -> str | None:
    from o2u_server.datasets import infer_format  # the format table imports the exports

    dataset_format = spec.dataset_format or infer_format(spec.dataset_uri)
    if "://" in key:
        return key
    if dataset_format in _FOLDER_FORMATS:
        return spec.dataset_uri.rstrip("/") + "/" + key
    if dataset_format in _MANIFEST_FORMATS:
        return spec.dataset_uri.rsplit("/", 1)[0] + "/" + key
    return None


def _choices(label: object) -> list[dict[str, object]]:
    return [
        {"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices", "value": {"choices": [str(label)]}}
    ]


def _task(
    row: dict[str, object], job_id: str, spec: JobSpec, originals: Mapping[str, dict[str, object]]
) -> dict[str, object]:
    key = str(row["key"])
    data: dict[str, object] = {
        **originals.get(key, {}),
        "o2u_key": key,
        "o2u_sample_id": row["sample_id"],
        "o2u_rank": row["rank"],
        "o2u_noise_score": row["score"],
        "o2u_noise_probability": row["noise_probability"],
    }
    image = None if key in originals else _image_uri(spec, key)
    if image is not None:
        data[TO_NAME] = image
    confidence = float(str(row["suggested_label_confidence"]))
    return {
        "data": data,
        "annotations": [{"result": _choices(row["given_label_name"]), "ground_truth": False}],
        "predictions": [
            {"model_version": job_id, "score": confidence, "result": _choices(row["suggested_label_name"])}
        ],
    }


def original_data(raw: bytes, keys: Collection[str] | None = None) -> dict[str, dict[str, object]]:
    """The `data` of each task of a Label Studio export by task id (a dataset's keys), of the tasks
    whose id is in `keys` when given. The tasks are decoded one at a time, so only the data kept is
    held. ValueError when `raw` is not UTF-8, InvalidArgument when it is no Label Studio export."""
    originals: dict[str, dict[str, object]] = {}
    for index, task in enumerate(export_tasks(raw.decode("utf-8-sig"), "the dataset"), start=1):
        if isinstance(task, dict) and isinstance(task.get("data"), dict):
            task_id = task_key(task, index)
            if keys is None or task_id in keys:
                originals[task_id] = dict(task["data"])
    return originals


def suspected_rows(rows: Iterable[dict[str, object]]) -> list[dict[str, object]]:
    """The suspected `rows`, by rank: the samples a Label Studio export holds."""
    return sorted((row for row in rows if row.get("suspected")), key=lambda row: int(str(row["rank"])))


def write_label_studio_tasks(
    suspects: Iterable[dict[str, object]],
    job_id: str,
    spec: JobSpec,
    out: TextIO,
    originals: Mapping[str, dict[str, object]] | None = None,
) -> int:
    """Write the `suspects` (suspected rows, by rank: `suspected_rows`) to `out` as one JSON array of
    tasks, a task at a time; returns the tasks written. `originals` (a Label Studio dataset's tasks'
    data by id) gives each task its original data."""
    count = 0
    out.write("[")
    for row in suspects:
        if count:
            out.write(",")
        out.write(json.dumps(_task(row, job_id, spec, originals or {}), separators=(",", ":")))
        count += 1
    out.write("]")
    return count
