"""The Label Studio format on a fixture shaped as Label Studio's JSON export writes it (task ids,
annotations with `was_cancelled`, `choices` results, local-files and relative image paths), on
real files and a real S3 server."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from o2u_server.datasets import infer_format, load_dataset
from o2u_server.datasets.label_studio import choose_label
from o2u_server.domain import DatasetFormat
from o2u_server.errors import InvalidArgument
from tests.o2u_server.dataset_files import COLOURS, LIMITS, Store, png, solid
from tests.s3_server import S3Server


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, root: Path, s3: S3Server) -> Store:
    return Store(root, s3, request.param)


def annotation(ident: int, task: int, label: str, updated: str, cancelled: bool = False) -> dict[str, object]:
    return {
        "id": ident,
        "completed_by": 1,
        "result": [
            {
                "value": {"choices": [label]},
                "id": f"r{ident}",
                "from_name": "label",
                "to_name": "image",
                "type": "choices",
                "origin": "manual",
            }
        ],
        "was_cancelled": cancelled,
        "ground_truth": False,
        "created_at": "2026-11-30T10:00:00.000000Z",
        "updated_at": updated,
        "draft_created_at": None,
        "lead_time": 3.2,
        "prediction": {},
        "result_count": 0,
        "unique_id": f"u-{ident}",
        "import_id": None,
        "last_action": None,
        "task": task,
        "project": 7,
        "updated_by": 1,
        "parent_prediction": None,
        "parent_annotation": None,
        "last_created_by": None,
    }


def task(ident: int, image: str, annotations: list[dict[str, object]]) -> dict[str, object]:
    return {
        "id": ident,
        "annotations": annotations,
        "file_upload": f"{ident}-x.png",
        "drafts": [],
        "predictions": [],
        "data": {"image": image},
        "meta": {},
        "created_at": "2026-11-30T09:00:00.000000Z",
        "updated_at": "2026-11-30T11:00:00.000000Z",
        "inner_id": ident,
        "total_annotations": len(annotations),
        "cancelled_annotations": sum(1 for a in annotations if a["was_cancelled"]),
        "total_predictions": 0,
        "comment_count": 0,
        "unresolved_comment_count": 0,
        "last_comment_updated_at": None,
        "project": 7,
        "updated_by": 1,
        "comment_authors": [],
    }


def make_export(store: Store) -> str:
    names = list(COLOURS)
    for i, name in enumerate(names * 2):
        store.put(f"ls/images/{i:02d}.png", png(solid(COLOURS[name], i)))
    tasks = []
    for i, name in enumerate(names * 2):
        image = f"/data/local-files/?d=images/{i:02d}.png" if i % 2 else f"images/{i:02d}.png"
        wrong = names[(names.index(name) + 1) % 3]
        anns = [
            annotation(100 + i, 40 + i, wrong, "2026-11-30T10:01:00.000000Z"),
            annotation(200 + i, 40 + i, name, "2026-11-30T10:05:00.000000Z"),  # the latest counts
            annotation(300 + i, 40 + i, wrong, "2026-11-30T10:09:00.000000Z", cancelled=True),
        ]
        tasks.append(task(40 + i, image, anns))
    tasks.append(
        task(90, "images/00.png", [annotation(900, 90, "cat", "2026-11-30T10:00:00Z", cancelled=True)])
    )
    tasks.append(
        task(91, "https://elsewhere.example/x.png", [annotation(901, 91, "cat", "2026-11-30T10:00:00Z")])
    )
    return store.put("ls/export.json", json.dumps(tasks).encode())


def test_a_label_studio_export_loads_with_task_ids_as_keys(store: Store) -> None:
    uri = make_export(store)
    assert infer_format(uri) == DatasetFormat.LABEL_STUDIO
    dataset = load_dataset(uri, None, store.storage, LIMITS)
    assert dataset.keys == [str(40 + i) for i in range(6)], "cancelled and foreign-image tasks are skipped"
    assert dataset.class_names == sorted(COLOURS)
    names = list(COLOURS) * 2
    assert [dataset.class_names[label] for label in dataset.labels] == names
    np.testing.assert_array_equal(dataset.features[1], solid(COLOURS[names[1]], 1))


def test_choose_label_rules() -> None:
    anns = [
        annotation(1, 1, "dog", "2026-11-30T10:01:00Z"),
        annotation(2, 1, "dog", "2026-11-30T10:02:00Z"),
        annotation(3, 1, "cat", "2026-11-30T10:03:00Z"),
        annotation(4, 1, "emu", "2026-11-30T10:04:00Z", cancelled=True),
    ]
    assert choose_label(anns) == ("cat", "")
    assert choose_label(anns, rule="majority") == ("dog", "")
    assert choose_label([anns[3]]) == (None, "ALL_ANNOTATIONS_CANCELLED")
    assert choose_label([]) == (None, "NO_ANNOTATIONS")


def test_not_an_export_is_invalid(store: Store) -> None:
    uri = store.put("ls/bad.json", b'{"tasks": []}')
    with pytest.raises(InvalidArgument, match="list of tasks"):
        load_dataset(uri, DatasetFormat.LABEL_STUDIO, store.storage, LIMITS)
