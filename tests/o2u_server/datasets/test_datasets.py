"""load_dataset on .npz archives and CSV/JSONL manifests, on real files and a real S3 server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from o2u_engine.statistics import STATE_BYTES_PER_SAMPLE_CLASS
from o2u_server.datasets import DatasetLimits, load_dataset
from o2u_server.datasets.dataset import STAGE_2_BYTES_PER_SAMPLE_CLASS
from o2u_server.domain import DatasetFormat
from o2u_server.errors import InvalidArgument, NotFound, PermissionDenied, ResourceExhausted
from o2u_server.storage import Storage
from tests.o2u_server.dataset_files import (
    COLOURS,
    LIMITS,
    Store,
    make_folder,
    make_storage,
    npz_bytes,
    png,
    solid,
)
from tests.s3_server import S3Server


@pytest.fixture
def storage(root: Path, s3: S3Server) -> Storage:
    return make_storage(root, s3)


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, root: Path, s3: S3Server) -> Store:
    return Store(root, s3, request.param)


# ---- .npz -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_images_round_trip(store: Store, compressed: bool) -> None:
    x = np.random.default_rng(0).integers(0, 256, size=(5, 4, 4, 3), dtype=np.uint8)
    y = np.array([0, 1, 2, 1, 0])
    uri = store.put("sets/images.npz", npz_bytes(compressed, x=x, y=y))
    dataset = load_dataset(uri, None, store.storage, LIMITS)
    np.testing.assert_array_equal(dataset.features, x)
    np.testing.assert_array_equal(dataset.labels, y)
    assert dataset.labels.dtype == np.int64
    assert dataset.keys == ["0", "1", "2", "3", "4"]
    assert dataset.class_names == ["0", "1", "2"]
    assert dataset.source == store.scheme
    assert dataset.bytes_read == len(npz_bytes(compressed, x=x, y=y))
    assert dataset.features.flags.writeable  # torch.from_numpy must not warn about read-only memory


@pytest.mark.parametrize("fortran", [False, True])
def test_a_local_npz_is_read_into_owned_memory_that_a_rewrite_cannot_touch(
    root: Path, storage: Storage, fortran: bool
) -> None:
    x = np.arange(400 * 3, dtype=np.float32).reshape(400, 3)
    x = np.asfortranarray(x) if fortran else x
    path = root / f"owned-{fortran}.npz"
    np.savez(path, x=x, y=np.arange(400) % 2)
    dataset = load_dataset(path.as_uri(), DatasetFormat.NPZ, storage, LIMITS)
    base = dataset.features
    while base.base is not None:
        base = base.base
    assert not isinstance(base, np.memmap)
    assert dataset.features.flags.owndata or isinstance(base, np.ndarray)
    digest = dataset.digest
    np.savez(path, x=x + 1, y=np.arange(400) % 2)  # the owner re-saves the file in place...
    path.write_bytes(path.read_bytes()[:100])  # ...or truncates it: the loaded data does not change
    np.testing.assert_array_equal(dataset.features, x)
    assert len(digest) == 64


def test_npz_features_with_string_labels_ids_and_class_names(store: Store) -> None:
    x = np.random.default_rng(1).normal(size=(4, 8)).astype(np.float32)
    y = np.array(["wolf", "ant", "wolf", "bee"])
    ids = np.array(["a", "b", "c", "d"])
    uri = store.put("sets/features.npz", npz_bytes(x=x, y=y, ids=ids))
    dataset = load_dataset(uri, DatasetFormat.NPZ, store.storage, LIMITS)
    assert dataset.class_names == ["ant", "bee", "wolf"]
    assert dataset.labels.tolist() == [2, 0, 2, 1]
    assert dataset.keys == ["a", "b", "c", "d"]
    np.testing.assert_array_equal(dataset.features, x)
    named = store.put(
        "sets/named.npz", npz_bytes(x=x, y=np.array([1, 0, 1, 0]), class_names=np.array(["no", "yes"]))
    )
    assert load_dataset(named, None, store.storage, LIMITS).class_names == ["no", "yes"]


def test_npz_object_array_is_refused(store: Store) -> None:
    uri = store.put(
        "sets/pickled.npz", npz_bytes(x=np.zeros((2, 3)), y=np.array([{"a": 1}, None], dtype=object))
    )
    with pytest.raises(InvalidArgument, match="object arrays are refused"):
        load_dataset(uri, None, store.storage, LIMITS)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((2, 3))}, "lacks the array"),
        ({"x": np.zeros((2, 3)), "y": np.array([0, 1, 1])}, "shape"),
        ({"x": np.zeros((2, 3)), "y": np.array([0, -1])}, "negative"),
        ({"x": np.zeros((2, 3)), "y": np.array([0.5, 1.0])}, "integers or strings"),
        ({"x": np.zeros((0, 3)), "y": np.zeros(0, dtype=int)}, "no samples"),
        ({"x": np.array(["a", "b"]), "y": np.array([0, 1])}, "x must be numbers"),
    ],
)
def test_malformed_npz_is_invalid(root: Path, storage: Storage, arrays: dict[str, Any], message: str) -> None:
    (root / "bad.npz").write_bytes(npz_bytes(**arrays))
    with pytest.raises(InvalidArgument, match=message):
        load_dataset(f"file://{root}/bad.npz", None, storage, LIMITS)


def test_not_a_zip_is_invalid(store: Store) -> None:
    uri = store.put("sets/garbage.npz", b"this is not a zip archive")
    with pytest.raises(InvalidArgument, match=r"not a valid \.npz"):
        load_dataset(uri, None, store.storage, LIMITS)


def test_npz_limits_are_checked_before_loading(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    x = np.zeros((50, 8, 8), dtype=np.uint8)
    uri = store.put("sets/big.npz", npz_bytes(x=x, y=np.zeros(50, dtype=int)))
    storage = store.storage
    with pytest.raises(ResourceExhausted, match=r"max_samples \(O2U_MAX_SAMPLES\) = 49"):
        load_dataset(uri, None, storage, DatasetLimits(LIMITS.max_bytes, 49, LIMITS.max_image_pixels))
    with pytest.raises(ResourceExhausted, match="max_image_pixels"):
        load_dataset(uri, None, storage, DatasetLimits(LIMITS.max_bytes, 100, 63))

    def no_download(*args: Any, **kwargs: Any) -> bytearray:
        raise AssertionError("downloaded although the size limit was already exceeded")

    monkeypatch.setattr(Storage, "read_buffer", no_download)
    with pytest.raises(ResourceExhausted, match="max_dataset_bytes"):
        load_dataset(uri, None, storage, DatasetLimits(1000, 100, 100))


# ---- manifests ------------------------------------------------------------------------------------


def test_the_per_class_state_charged_is_the_engines() -> None:
    assert STAGE_2_BYTES_PER_SAMPLE_CLASS == STATE_BYTES_PER_SAMPLE_CLASS


def test_stage_2s_per_class_state_counts_against_the_decoded_limit(store: Store) -> None:
    # 100 samples x 50 classes: 800 bytes of features, 10 x 100 x 50 = 50,000 bytes of stage 2's
    # votes and probabilities, which would take the device past the limit as surely as the samples
    labels = np.arange(100) % 50
    uri = store.put("sets/classes.npz", npz_bytes(x=np.zeros((100, 2), dtype=np.float32), y=labels))
    limits = DatasetLimits(LIMITS.max_bytes, 100, LIMITS.max_image_pixels, 50, 50_000)
    assert len(load_dataset(uri, None, store.storage, limits).labels) == 100
    tight = DatasetLimits(LIMITS.max_bytes, 100, LIMITS.max_image_pixels, 50, 49_999)
    with pytest.raises(ResourceExhausted, match=r"100 samples x 50 classes.* 50000 bytes.*max_decoded_bytes"):
        load_dataset(uri, None, store.storage, tight)


def test_csv_manifest_with_integer_labels(store: Store) -> None:
    expected = make_folder(store, "manifested")
    rows = "key,label\n" + "".join(f"{key},{i % 2}\n" for i, key in enumerate(sorted(expected)))
    uri = store.put("manifested/labels.csv", rows.encode())
    dataset = load_dataset(uri, None, store.storage, LIMITS)
    assert dataset.keys == sorted(expected)
    assert dataset.labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert dataset.class_names == ["0", "1"]
    np.testing.assert_array_equal(dataset.features[1], expected[sorted(expected)[1]])
    assert dataset.bytes_read == len(rows) + sum(len(png(pixels)) for pixels in expected.values())


def test_jsonl_manifest_with_string_labels(store: Store) -> None:
    expected = make_folder(store, "deep/images")
    lines = [
        json.dumps({"key": f"images/{key}", "label": key.split("/")[0].upper()}) for key in sorted(expected)
    ]
    uri = store.put("deep/manifest.jsonl", ("\n".join(reversed(lines)) + "\n\n").encode())
    dataset = load_dataset(uri, DatasetFormat.JSONL_MANIFEST, store.storage, LIMITS)
    assert dataset.keys == [f"images/{key}" for key in sorted(expected, reverse=True)]
    assert dataset.class_names == ["CAT", "DOG", "EMU"]
    assert dataset.labels.tolist() == [2, 2, 1, 1, 0, 0]
    np.testing.assert_array_equal(dataset.features[0], expected[sorted(expected)[-1]])


@pytest.mark.parametrize(
    ("text", "error", "message"),
    [
        ("key,label\n../outside.png,cat\n", PermissionDenied, "leaves the manifest's folder"),
        ("key,label\n/etc/passwd,cat\n", InvalidArgument, "relative to the manifest"),
        ("key,label\nimg/missing.png,cat\n", NotFound, "missing.png"),
        ("name,label\nimg/a.png,cat\n", InvalidArgument, "header"),
        ("key,label\n", InvalidArgument, "no samples"),
        ("key,label\nimg/a.png,cat\nimg/a.png,dog\n", InvalidArgument, "listed twice"),
    ],
)
def test_bad_manifests(store: Store, text: str, error: type[Exception], message: str) -> None:
    store.put("bad/img/a.png", png(solid((1, 2, 3), 0)))
    uri = store.put("bad/labels.csv", text.encode())
    with pytest.raises(error, match=message):
        load_dataset(uri, None, store.storage, LIMITS)


def test_manifest_key_linking_outside_the_roots_is_denied(root: Path, storage: Storage) -> None:
    outside = root.parent / "outside.png"
    outside.write_bytes(png(solid((1, 2, 3), 0)))
    (root / "img").mkdir()
    (root / "img" / "link.png").symlink_to(outside)
    (root / "labels.csv").write_text("key,label\nimg/link.png,cat\n")
    with pytest.raises(PermissionDenied, match="outside the server's data roots"):
        load_dataset(f"file://{root}/labels.csv", None, storage, LIMITS)


def test_mixed_label_types_in_jsonl_are_invalid(store: Store) -> None:
    store.put("mixed-labels/a.png", png(solid((1, 2, 3), 0)))
    store.put("mixed-labels/b.png", png(solid((1, 2, 3), 1)))
    lines = '{"key": "a.png", "label": 1}\n{"key": "b.png", "label": "dog"}\n'
    uri = store.put("mixed-labels/labels.jsonl", lines.encode())
    with pytest.raises(InvalidArgument, match="mix integers and strings"):
        load_dataset(uri, None, store.storage, LIMITS)


def test_manifest_sample_limit(store: Store) -> None:
    rows = "key,label\n" + "".join(f"img/{i}.png,cat\n" for i in range(10))
    uri = store.put("many/labels.csv", rows.encode())
    with pytest.raises(ResourceExhausted, match="max_samples"):
        load_dataset(uri, None, store.storage, DatasetLimits(LIMITS.max_bytes, 9, 1000))


def test_a_manifest_over_a_wide_folder_looks_its_keys_up_instead_of_listing_it_all(
    root: Path, s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys in unrelated folders of the manifest's folder (here with 60 other objects between
    them): the listing stops after twice the keys plus LISTING_SLACK objects, and the keys still
    missing are looked up one by one."""
    from o2u_server.datasets import manifests

    store = Store(root, s3, "s3")
    monkeypatch.setattr(manifests, "LISTING_SLACK", 5)
    keys = ["a/0.png", "a/1.png", "z/0.png", "z/1.png"]
    for index, key in enumerate(keys):
        store.put(f"wide/{key}", png(solid(COLOURS["cat" if index % 2 else "dog"], index)))
    for n in range(60):
        store.put(f"wide/m/{n:02d}.bin", b"another team's object")
    rows = "key,label\n" + "".join(f"{key},{'cat' if i % 2 else 'dog'}\n" for i, key in enumerate(keys))
    uri = store.put("wide/labels.csv", rows.encode())
    listed: list[str] = []
    real_iter_objects = store.storage.iter_objects

    def counting(*args: Any, **kwargs: Any) -> Any:
        for info in real_iter_objects(*args, **kwargs):
            listed.append(info.relative_key)
            yield info

    monkeypatch.setattr(store.storage, "iter_objects", counting)
    dataset = load_dataset(uri, None, store.storage, LIMITS)
    assert dataset.keys == keys
    assert dataset.class_names == ["cat", "dog"]
    assert len(listed) == 2 * len(keys) + 5 + 1  # the budget, then one object past it
    assert "z/0.png" not in listed  # found by its own lookup


def test_past_the_listing_budget_keys_are_looked_up_in_order_up_to_the_first_missing_one(
    root: Path, s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    from o2u_server.datasets import manifests

    store = Store(root, s3, "s3")
    monkeypatch.setattr(manifests, "LISTING_SLACK", 0)
    for n in range(20):
        store.put(f"gap/m/{n:02d}.bin", b"another team's object")
    keys = ["a/missing.png", *(f"z/{n}.png" for n in range(5))]  # their common folder: gap/
    for key in keys[1:]:
        store.put(f"gap/{key}", png(solid(COLOURS["cat"], 0)))
    rows = "key,label\n" + "".join(f"{key},cat\n" for key in keys)
    uri = store.put("gap/labels.csv", rows.encode())
    looked_up: list[str] = []
    real_stat = store.storage.stat

    def counting(uri: str, **kwargs: Any) -> Any:
        looked_up.append(uri)
        return real_stat(uri, **kwargs)

    monkeypatch.setattr(store.storage, "stat", counting)
    with pytest.raises(NotFound, match=r"lists 'a/missing\.png'"):
        load_dataset(uri, None, store.storage, LIMITS)
    assert looked_up == ["s3://datasets/gap/a/missing.png"]  # not the five after it
