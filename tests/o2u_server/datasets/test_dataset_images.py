"""load_dataset on image folders: decoding, modes and sizes, broken files and decompression bombs."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import ImageFile

from o2u_server.datasets import DatasetLimits, load_dataset
from o2u_server.domain import DatasetFormat
from o2u_server.errors import InvalidArgument, ResourceExhausted
from o2u_server.storage import Storage
from tests.o2u_server.dataset_files import LIMITS, Store, bomb_png, make_folder, png, solid
from tests.s3_server import S3Server


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, root: Path, s3: S3Server) -> Store:
    return Store(root, s3, request.param)


def test_image_folder_round_trip(store: Store) -> None:
    expected = make_folder(store, "folder")
    dataset = load_dataset(store.uri("folder"), None, store.storage, LIMITS)
    assert dataset.class_names == ["cat", "dog", "emu"]
    assert dataset.keys == sorted(expected)
    assert dataset.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert dataset.features.shape == (6, 5, 6, 3)
    assert dataset.features.dtype == np.uint8
    for key, image in zip(dataset.keys, dataset.features, strict=True):
        np.testing.assert_array_equal(image, expected[key])
    assert dataset.source == store.scheme
    assert dataset.bytes_read == sum(len(png(pixels)) for pixels in expected.values())


def test_image_folder_mixes_modes_sizes_and_jpeg(store: Store) -> None:
    store.put("mixed/a/0.png", png(solid((10, 20, 30), 0)))
    store.put("mixed/a/1.png", png(solid((10, 20, 30), 1)))
    store.put("mixed/b/2.jpg", png(solid((40, 50, 60), 2), image_format="JPEG"))
    store.put("mixed/b/3.png", png(np.full((5, 6), 77, dtype=np.uint8)))  # grayscale minority
    store.put("mixed/b/4.PNG", png(solid((90, 90, 90), 4, size=(12, 10))))  # larger minority size
    dataset = load_dataset(store.uri("mixed/"), DatasetFormat.IMAGE_FOLDER, store.storage, LIMITS)
    assert dataset.features.shape == (5, 5, 6, 3)
    assert dataset.keys == ["a/0.png", "a/1.png", "b/2.jpg", "b/3.png", "b/4.PNG"]
    np.testing.assert_array_equal(dataset.features[3], np.full((5, 6, 3), 77))
    assert abs(int(dataset.features[2, 2, 2, 0]) - 40) < 8  # JPEG is lossy


def test_grayscale_majority_gives_a_grayscale_array(store: Store) -> None:
    store.put("gray/a/0.png", png(np.full((4, 4), 5, dtype=np.uint8)))
    store.put("gray/a/1.png", png(np.full((4, 4), 6, dtype=np.uint8)))
    store.put("gray/b/2.png", png(solid((255, 255, 255), 0, size=(4, 4))))
    dataset = load_dataset(store.uri("gray"), None, store.storage, LIMITS)
    assert dataset.features.shape == (3, 4, 4)
    assert dataset.features[2, 1, 1] == 255


@pytest.mark.parametrize(
    "size", [(50_000, 50_000), (5_000, 5_000)], ids=["past-pillow-guard", "past-setting"]
)
def test_decompression_bomb_is_refused_before_decoding(
    store: Store, monkeypatch: pytest.MonkeyPatch, size: tuple[int, int]
) -> None:
    loads: list[object] = []
    real_load = ImageFile.ImageFile.load

    def counting_load(self: ImageFile.ImageFile) -> Any:
        loads.append(self)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    make_folder(store, "bomb", per_class=1)
    store.put("bomb/dog/zz-bomb.png", bomb_png(*size))
    with pytest.raises(ResourceExhausted, match=r"'dog/zz-bomb\.png'.*max_image_pixels") as caught:
        load_dataset(store.uri("bomb"), None, store.storage, LIMITS)
    assert caught.value.metadata["limit"] == "max_image_pixels"
    assert loads == []


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_broken_images_are_invalid_naming_the_key(store: Store, damage: str) -> None:
    make_folder(store, "broken", per_class=1)
    noise = np.random.default_rng(2).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    data = png(noise)[:600] if damage == "truncated" else b"GIF89a but really just garbage bytes"
    store.put("broken/emu/bad.png", data)
    with pytest.raises(InvalidArgument, match=r"'emu/bad\.png'") as caught:
        load_dataset(store.uri("broken"), None, store.storage, LIMITS)
    assert caught.value.metadata["key"] == "emu/bad.png"
    assert " at 0x" not in caught.value.message  # no in-memory stream's address


@pytest.mark.parametrize(("data", "said"), [(b"", "empty"), (b"just text, no image", "19 bytes")])
def test_a_file_that_is_no_image_says_so_plainly(store: Store, data: bytes, said: str) -> None:
    make_folder(store, "plain", per_class=1)
    store.put("plain/emu/notes.png", data)
    with pytest.raises(InvalidArgument) as caught:
        load_dataset(store.uri("plain"), None, store.storage, LIMITS)
    assert caught.value.message == (
        f"image 'emu/notes.png' is not a readable PNG or JPEG file: neither format's signature ({said})"
    )


def test_image_folder_limits_are_named(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    make_folder(store, "limits")
    storage = store.storage
    with pytest.raises(ResourceExhausted, match=r"max_samples \(O2U_MAX_SAMPLES\) = 5"):
        load_dataset(store.uri("limits"), None, storage, DatasetLimits(LIMITS.max_bytes, 5, 1000))
    with pytest.raises(ResourceExhausted, match=r"max_image_pixels \(O2U_MAX_IMAGE_PIXELS\) is 29"):
        load_dataset(store.uri("limits"), None, storage, DatasetLimits(LIMITS.max_bytes, 100, 29))
    monkeypatch.setattr(
        Storage, "read_object", lambda *args, **kwargs: pytest.fail("read past the byte limit")
    )
    with pytest.raises(ResourceExhausted, match=r"max_dataset_bytes \(O2U_MAX_DATASET_BYTES\) = 100"):
        load_dataset(store.uri("limits"), None, storage, DatasetLimits(100, 100, 1000))


def test_empty_folder_is_invalid(store: Store) -> None:
    store.put("empty/README.txt", b"no classes here")
    with pytest.raises(InvalidArgument, match="no samples"):
        load_dataset(store.uri("empty/"), None, store.storage, LIMITS)


def test_concurrent_loads_share_the_cache(store: Store) -> None:
    expected = make_folder(store, "shared")
    first = load_dataset(store.uri("shared"), None, store.storage, LIMITS)
    with ThreadPoolExecutor(max_workers=3) as pool:
        again = list(
            pool.map(lambda _: load_dataset(store.uri("shared"), None, store.storage, LIMITS), range(3))
        )
    encoded = sum(len(png(pixels)) for pixels in expected.values())
    assert first.bytes_read == encoded
    for dataset in again:
        np.testing.assert_array_equal(dataset.features, first.features)
        # Objects whose ETag is unchanged come from the cache; local files are read again.
        assert dataset.bytes_read == (0 if store.scheme == "s3" else encoded)
