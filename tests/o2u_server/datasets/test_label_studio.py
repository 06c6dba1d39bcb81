"""The Label Studio format on a fixture shaped as Label Studio's JSON export writes it (task ids,
annotations with `was_cancelled`, `choices` results, local-files and relative image paths), on
real files and a real S3 server."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from o2u_server.datasets import infer_format, load_dataset
from o2u_server.datasets.label_studio import (
    MAX_SKIPPED_KEYS,
    SKIP_REASONS,
    SkippedTasks,
    choose_label,
    export_tasks,
    label_studio_rows,
)
from o2u_server.datasets.label_studio_export import original_data
from o2u_server.domain import DatasetFormat, DatasetOptions, LabelStudioOptions, SkippedRecords
from o2u_server.errors import InvalidArgument, NotFound
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


def test_latest_compares_times_not_their_text() -> None:
    # The same second with and without fractional seconds, and an offset: as text the first sorts
    # last ("Z" > "."), as times it is the earliest.
    anns = [
        annotation(1, 1, "dog", "2026-11-30T10:01:00Z"),
        annotation(2, 1, "cat", "2026-11-30T10:01:00.250000Z"),
        annotation(3, 1, "emu", "2026-11-30T11:00:30+02:00"),  # 09:00:30 UTC, the oldest
    ]
    assert choose_label(anns) == ("cat", "")
    assert choose_label([anns[0], annotation(2, 1, "cat", "not a time")]) == ("dog", "")


def rules_export(store: Store) -> tuple[str, dict[str, str], dict[str, str]]:
    """Six tasks whose image is in `data.photo` (`data.image` names decoys that do not exist),
    with two early annotations that agree and a later one that does not, plus a tie; returns the
    export's URI and the labels `latest` and `majority` give each task id."""
    names = list(COLOURS)
    latest, majority = {}, {}
    tasks = []
    for i in range(6):
        name, other = names[i % 3], names[(i + 1) % 3]
        store.put(f"ls2/images/{i:02d}.png", png(solid(COLOURS[name], i)))
        anns = [
            annotation(100 + i, 60 + i, name, "2026-11-30T10:01:00Z"),
            annotation(200 + i, 60 + i, other, "2026-11-30T10:09:00Z"),  # the latest
            annotation(300 + i, 60 + i, name, "2026-11-30T10:02:00Z"),  # listed last, not the latest
            annotation(400 + i, 60 + i, other, "2026-11-30T10:10:00Z", cancelled=True),
        ]
        if i == 5:  # a tie goes to the latest of the tied
            anns = anns[:2] + anns[3:]
        photo = store.uri(f"ls2/images/{i:02d}.png") if i == 3 else f"images/{i:02d}.png"
        record = task(60 + i, f"images/decoy-{i}.png", anns)
        record["data"] = {"image": f"images/decoy-{i}.png", "photo": photo}
        tasks.append(record)
        latest[str(60 + i)], majority[str(60 + i)] = other, name if i != 5 else other
    return store.put("ls2/export.json", json.dumps(tasks).encode()), latest, majority


@pytest.mark.parametrize("rule", ["", "latest", "majority"])
def test_the_annotation_rule_and_image_field_choose_label_and_image(store: Store, rule: str) -> None:
    uri, latest, majority = rules_export(store)
    options = DatasetOptions(label_studio=LabelStudioOptions(annotation_rule=rule, image_field="photo"))
    dataset = load_dataset(uri, None, store.storage, LIMITS, options=options)
    expected = majority if rule == "majority" else latest
    assert dataset.keys == list(expected)
    assert [dataset.class_names[label] for label in dataset.labels] == list(expected.values())
    names = list(COLOURS)
    for i, image in enumerate(dataset.features):
        np.testing.assert_array_equal(image, solid(COLOURS[names[i % 3]], i))
    assert dataset.skipped == []


def test_the_default_image_field_is_image(store: Store) -> None:
    uri, _, _ = rules_export(store)
    with pytest.raises(NotFound, match=r"images/decoy-0\.png"):
        load_dataset(uri, None, store.storage, LIMITS)


def test_skipped_tasks_are_reported_per_reason_with_their_first_ids(store: Store) -> None:
    store.put("ls3/images/00.png", png(solid(COLOURS["cat"], 0)))
    usable = annotation(1, 1, "cat", "2026-11-30T10:00:00Z")
    cancelled = annotation(2, 1, "cat", "2026-11-30T10:00:00Z", cancelled=True)
    no_choices = annotation(3, 1, "cat", "2026-11-30T10:00:00Z")
    no_choices["result"] = [{"type": "rectanglelabels", "value": {"x": 1}}]
    tasks = [task(10, "images/00.png", [usable])]
    tasks += [task(500 + i, "images/00.png", [cancelled]) for i in range(MAX_SKIPPED_KEYS + 2)]
    tasks += [task(700, "images/00.png", [cancelled, no_choices]), task(701, "images/00.png", [no_choices])]
    tasks += [task(800, "https://elsewhere.example/x.png", [usable]), task(801, "", [usable])]
    tasks.append(task(600, "https://elsewhere.example/y.png", []))  # no annotations counts first
    no_field = task(802, "images/00.png", [usable])
    no_field["data"] = {"text": "no image here"}
    tasks.append(no_field)
    uri = store.put("ls3/export.json", json.dumps(tasks).encode())
    dataset = load_dataset(uri, None, store.storage, LIMITS)
    assert dataset.keys == ["10"]
    cancelled_ids = tuple(str(500 + i) for i in range(MAX_SKIPPED_KEYS))
    assert dataset.skipped == [
        SkippedRecords("NO_ANNOTATIONS", SKIP_REASONS["NO_ANNOTATIONS"], 1, ("600",)),
        SkippedRecords(
            "ALL_ANNOTATIONS_CANCELLED", SKIP_REASONS["ALL_ANNOTATIONS_CANCELLED"], 12, cancelled_ids
        ),
        SkippedRecords("NO_CHOICES_RESULT", SKIP_REASONS["NO_CHOICES_RESULT"], 2, ("700", "701")),
        SkippedRecords("NO_IMAGE", SKIP_REASONS["NO_IMAGE"], 3, ("800", "801", "802")),
    ]


def test_not_an_export_is_invalid(store: Store) -> None:
    uri = store.put("ls/bad.json", b'{"tasks": []}')
    with pytest.raises(InvalidArgument, match="list of tasks"):
        load_dataset(uri, DatasetFormat.LABEL_STUDIO, store.storage, LIMITS)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not valid JSON: expected '\\[' at line 1 column 1"),
        ('{"tasks": []}', r"a list of tasks\), not an object"),
        ('"tasks"', r"a list of tasks\), not a string"),
        ("[{}, ]", "not valid JSON: Expecting value: line 1 column 6"),
        ("[{} {}]", "not valid JSON: expected ',' or ']' at line 1 column 5"),
        ("[{}", "not valid JSON: expected ',' or ']' at line 1 column 4"),
        ("[]\n[]", "not valid JSON: extra data after the list at line 2 column 1"),
        ("[" * 100_000, "not valid JSON: maximum recursion depth"),
    ],
)
def test_a_malformed_export_is_refused_naming_the_place(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        list(export_tasks(text, "export.json"))


def test_an_export_is_decoded_one_task_at_a_time() -> None:
    """Only the task being read is held as objects: json.loads of the whole export took about 6
    times its size, here the rows and keys kept are most of what is allocated."""
    tasks = [
        task(i, f"images/{i:06d}.png", [annotation(i, i, "red", "2024-01-02T03:04:05Z")])
        for i in range(20_000)
    ]
    text = json.dumps(tasks)
    del tasks
    tracemalloc.start()
    try:
        rows = list(label_studio_rows(text, "file:///data/export.json", {}, SkippedTasks()))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(rows) == 20_000
    assert peak < len(text)  # json.loads: 6 times the text


def test_original_data_keeps_the_named_tasks_only() -> None:
    tasks = [task(i, f"images/{i:02d}.png", []) for i in (1, 2, 3)] + [{"no": "data"}]
    raw = json.dumps(tasks).encode()
    assert original_data(raw) == {str(i): {"image": f"images/{i:02d}.png"} for i in (1, 2, 3)}
    assert original_data(raw, {"2", "9"}) == {"2": {"image": "images/02.png"}}
    with pytest.raises(InvalidArgument, match="list of tasks"):
        original_data(b"5")


def test_unusable_tasks_are_counted_without_being_kept() -> None:
    """An export crafted of tasks that are all skipped (json.loads took 21 times its size) keeps
    counts and the first ids only."""
    text = "[" + ",".join(['{"data": {}}'] * 100_000) + "]"
    skipped = SkippedTasks()
    tracemalloc.start()
    try:
        assert list(label_studio_rows(text, "file:///data/export.json", {}, skipped)) == []
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < len(text) // 10  # json.loads: 21 times the text; tracemalloc also sees other threads
    [record] = skipped.records()
    assert (record.reason, record.count) == ("NO_ANNOTATIONS", 100_000)
    assert record.first_keys == tuple(str(i) for i in range(1, MAX_SKIPPED_KEYS + 1))


def test_results_of_other_shapes_are_no_choice_not_an_error() -> None:
    shapes: list[object] = [
        5,
        "cat",
        [{"type": "choices", "value": "cat"}],
        [{"type": "choices", "value": {"choices": 3}}],
    ]
    for result in shapes:
        label, reason = choose_label([{"id": 1, "result": result}])
        assert (label, reason) == (None, "NO_CHOICES_RESULT"), result


def test_repeated_task_ids_are_refused(store: Store) -> None:
    usable = [annotation(1, 1, "red", "2026-11-30T10:00:00Z")]
    tasks = [task(7, "images/00.png", usable), task(7, "images/01.png", usable)]
    uri = store.put("ls-ids/export.json", json.dumps(tasks).encode())
    with pytest.raises(InvalidArgument, match="task 2 has the id '7' of task 1; task ids must be unique"):
        load_dataset(uri, None, store.storage, LIMITS)


def test_tasks_without_an_id_are_keyed_by_their_place(store: Store) -> None:
    usable = [annotation(1, 1, "red", "2026-11-30T10:00:00Z")]
    tasks = [task(0, "images/00.png", usable), task(0, "images/01.png", usable)]
    tasks[0]["id"] = None
    del tasks[1]["id"]
    uri = store.put("ls-noid/export.json", json.dumps(tasks).encode())
    rows = list(label_studio_rows(json.dumps(tasks), uri, {}, SkippedTasks()))
    assert [key for _, key, _ in rows] == ["images/00.png", "images/01.png"]
    assert original_data(json.dumps(tasks).encode()) == {
        "1": {"image": "images/00.png"},
        "2": {"image": "images/01.png"},
    }
