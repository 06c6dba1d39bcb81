"""Property-based fuzz of dataset loading: labels and classes of every kind, and files changing under
the loader while it reads them.

Labels come as every NumPy dtype a caller can save (signed, unsigned up to 2**64 - 1, floats with NaN
and infinities, booleans, text and bytes with control characters), with or without class names, in
an .npz (stored or compressed) or a CSV/JSONL manifest. Races mutate a dataset while `load_dataset`
reads it: truncated, rewritten, deleted, swapped for a FIFO, a folder or a symlink leading out of the
data root. Whatever happens, the load ends, and it ends with a dataset inside the limits or one of
the service errors a caller can act on - never another exception, never a hang.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from o2u_server.datasets import DatasetLimits, LoadedDataset, load_dataset
from o2u_server.errors import InvalidArgument, NotFound, PermissionDenied, ResourceExhausted, ServiceError
from o2u_server.settings import Settings
from o2u_server.storage import Storage
from tests.o2u_server.dataset_files import png, solid

LIMITS = DatasetLimits(
    max_bytes=4 * 1024 * 1024,
    max_samples=200,
    max_image_pixels=4096,
    max_classes=20,
    max_decoded_bytes=1024 * 1024,
)
ACCEPTED = (InvalidArgument, ResourceExhausted, NotFound, PermissionDenied)
FUZZ = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

INTEGER_DTYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz-root")
    for index in range(12):  # images every manifest may list
        (folder / f"img-{index}.png").write_bytes(png(solid((index * 20, 50, 90), index)))
    return folder


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz-outside")
    np.savez(folder / "secret.npz", x=np.ones((12, 2), dtype=np.float32), y=np.arange(12) % 2)
    return folder


@pytest.fixture(scope="module")
def storage(root: Path) -> Storage:
    return Storage(Settings(data_roots=[root]))


def _check(dataset: LoadedDataset) -> None:
    """A loaded dataset is inside the limits and self-consistent."""
    count, classes = len(dataset.labels), len(dataset.class_names)
    assert 0 < count <= LIMITS.max_samples
    assert 0 < classes <= LIMITS.max_classes
    assert dataset.labels.dtype == np.int64
    assert int(dataset.labels.min()) >= 0
    assert int(dataset.labels.max()) < classes
    assert len(dataset.keys) == count
    assert dataset.features.shape[0] == count
    assert len(dataset.digest) == 64


def _outcome(load: Callable[[], LoadedDataset]) -> None:
    """Load; a dataset must pass `_check`, an error must be one a caller can act on."""
    refused: ServiceError | None = None
    try:
        _check(load())
    except ACCEPTED as error:
        refused = error
    event(refused.reason if refused is not None else "loaded")
    if refused is not None:
        assert refused.message
        assert refused.reason
        assert len(refused.message) < 2000


# ---- labels and classes -----------------------------------------------------------------------------

huge = st.sampled_from([0, 1, 19, 20, 2**31 - 1, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1])
integers = st.one_of(st.integers(0, 25), st.integers(-3, 25), huge, st.integers(-(2**63), 2**64 - 1))
texts = st.one_of(
    st.text("abcdefgh", min_size=1, max_size=3),  # names that make valid classes
    st.text(st.characters(codec="utf-8"), max_size=12),  # anything, control characters included
)
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)


@st.composite
def label_arrays(draw: st.DrawFn) -> np.ndarray[Any, Any]:
    count = draw(st.integers(1, 30))
    kind = draw(st.sampled_from(["int", "int", "int", "float", "bool", "text", "bytes"]))
    if kind == "int":
        dtype = draw(st.sampled_from(INTEGER_DTYPES))
        info = np.iinfo(dtype)
        values = draw(st.lists(integers, min_size=count, max_size=count))
        return np.array([min(max(value, int(info.min)), int(info.max)) for value in values], dtype=dtype)
    if kind == "float":
        return np.array(draw(st.lists(floats, min_size=count, max_size=count)), dtype=np.float64)
    if kind == "bool":
        return np.array(draw(st.lists(st.booleans(), min_size=count, max_size=count)))
    strings = draw(st.lists(texts, min_size=count, max_size=count))
    if kind == "bytes":
        return np.array([value.encode("utf-8")[:12] for value in strings], dtype="S12")
    return np.array(strings)


@given(
    labels=label_arrays(),
    class_names=st.one_of(st.none(), st.none(), st.lists(texts, max_size=30)),
    compressed=st.booleans(),
    ids=st.sampled_from(["none", "plain", "escape"]),
)
@FUZZ
def test_npz_labels_and_class_names(
    storage: Storage,
    root: Path,
    labels: np.ndarray[Any, Any],
    class_names: list[str] | None,
    compressed: bool,
    ids: str,
) -> None:
    arrays: dict[str, Any] = {"x": np.zeros((len(labels), 3), dtype=np.float32), "y": labels}
    if class_names is not None:
        arrays["class_names"] = np.array(class_names, dtype=str)
    if ids != "none":  # sample keys, one with a terminal escape in it
        bad = 3 if ids == "escape" else -1
        arrays["ids"] = np.array([f"s{i}\x1b[2J" if i == bad else f"s{i}" for i in range(len(labels))])
    handle, name = tempfile.mkstemp(dir=root, suffix=".npz")
    with os.fdopen(handle, "wb") as stream:
        (np.savez_compressed if compressed else np.savez)(stream, **arrays)
    try:
        _outcome(lambda: load_dataset(Path(name).as_uri(), None, storage, LIMITS))
    finally:
        os.unlink(name)


@given(
    labels=st.lists(st.one_of(integers.map(str), texts, st.just("")), min_size=1, max_size=12),
    form=st.sampled_from(["csv", "jsonl"]),
)
@FUZZ
def test_manifest_labels(storage: Storage, root: Path, labels: list[str], form: str) -> None:
    if form == "csv":
        text = "key,label\n" + "".join(
            f'img-{i}.png,"{label.replace(chr(34), chr(34) * 2)}"\n' for i, label in enumerate(labels)
        )
    else:
        rows = [
            f'{{"key": "img-{i}.png", "label": {label if label.lstrip("-").isdigit() else repr(label)}}}'
            for i, label in enumerate(labels)
        ]
        text = "\n".join(rows) + "\n"
    handle, name = tempfile.mkstemp(dir=root, suffix=f".{form}")
    with os.fdopen(handle, "w", encoding="utf-8", errors="surrogatepass") as stream:
        stream.write(text)
    try:
        _outcome(lambda: load_dataset(Path(name).as_uri(), None, storage, LIMITS))
    finally:
        os.unlink(name)


def test_an_npz_over_the_decoded_limit_is_refused_from_its_headers(
    storage: Storage, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from o2u_server.datasets.npz_archive import NpzArchive

    np.savez_compressed(
        root / "inflates.npz", x=np.zeros((100, 4096), dtype=np.float32), y=np.arange(100) % 2
    )
    monkeypatch.setattr(NpzArchive, "load", lambda *args: pytest.fail("an array was inflated"))
    with pytest.raises(ResourceExhausted, match="max_decoded_bytes"):
        load_dataset((root / "inflates.npz").as_uri(), None, storage, LIMITS)


# ---- files changing while they are read -------------------------------------------------------------


def _dataset(folder: Path, kind: str) -> tuple[str, Path]:
    """A small valid dataset of `kind` in `folder`: (its URI, the file a race will attack)."""
    if kind == "npz":
        np.savez(
            folder / "data.npz", x=np.random.default_rng(0).normal(size=(150, 500)), y=np.arange(150) % 3
        )
        return (folder / "data.npz").as_uri(), folder / "data.npz"
    if kind == "folder":
        for label in ("cat", "dog"):
            (folder / label).mkdir()
            for index in range(20):
                (folder / label / f"{index}.png").write_bytes(png(solid((10, 20, index * 9), index)))
        return folder.as_uri(), folder / "dog" / "7.png"
    for index in range(12):
        shutil.copy(folder.parent / f"img-{index}.png", folder / f"{index}.png")
    (folder / "labels.csv").write_text("key,label\n" + "".join(f"{i}.png,{i % 2}\n" for i in range(12)))
    return (folder / "labels.csv").as_uri(), folder / "5.png"


def _mutate(target: Path, how: str, outside: Path) -> None:
    if how == "truncate":
        os.truncate(target, target.stat().st_size // 3)
    elif how == "rewrite":
        target.write_bytes(os.urandom(target.stat().st_size))
    elif how == "delete":
        target.unlink()
    elif how == "fifo":
        target.unlink()
        os.mkfifo(target)
    elif how == "folder":
        target.unlink()
        target.mkdir()
    elif how == "symlink-out":
        target.unlink()
        target.symlink_to(outside / "secret.npz")


@given(
    kind=st.sampled_from(["npz", "folder", "manifest"]),
    how=st.sampled_from(["truncate", "rewrite", "delete", "fifo", "folder", "symlink-out"]),
    delay=st.sampled_from([0.0, 0.0005, 0.002, 0.01, 0.05]),
)
@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
def test_files_that_change_while_they_are_read(
    storage: Storage, root: Path, outside: Path, kind: str, how: str, delay: float
) -> None:
    folder = Path(tempfile.mkdtemp(dir=root, prefix=f"race-{kind}-"))
    uri, target = _dataset(folder, kind)
    outcome: list[object] = []
    limits = DatasetLimits(16 * 1024 * 1024, 1000, 4096, 20, 16 * 1024 * 1024)

    def load() -> None:
        try:
            _check(load_dataset(uri, None, storage, limits))
            outcome.append("loaded")
        except BaseException as error:  # recorded, so the main thread judges it
            outcome.append(error)

    reader = threading.Thread(target=load, daemon=True)
    reader.start()
    time.sleep(delay)
    _mutate(target, how, outside)
    reader.join(30)
    try:
        assert not reader.is_alive(), f"load_dataset hung after {how} of {target.name}"
        (result,) = outcome
        event(f"{how}: {getattr(result, 'reason', result)}")
        assert result == "loaded" or isinstance(result, ACCEPTED), repr(result)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
