"""Where load_dataset decodes the samples: into the array `allocate` gives (shared memory when the job
trains in other processes), for every format that decodes them, on real files and a real S3 server;
`shared_tensor` then moves nothing, so the server never holds them twice."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from o2u_engine.launch import shared_array, shared_tensor
from o2u_server.datasets import LoadedDataset, load_dataset
from tests.o2u_server.dataset_files import LIMITS, Store, make_folder, npz_bytes
from tests.s3_server import S3Server

X = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)
Y = np.arange(40) % 3


def _npz(store: Store, *, compressed: bool = False, x: np.ndarray[Any, Any] = X) -> str:
    return store.put("sets/x.npz", npz_bytes(compressed, x=x, y=Y))


def _parquet(store: Store) -> str:
    features = pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), X.shape[1])
    sink = io.BytesIO()
    pq.write_table(pa.table({"label": pa.array(Y), "features": features}), sink, row_group_size=16)
    return store.put("sets/x.parquet", sink.getvalue())


def _folder(store: Store) -> str:
    make_folder(store, "folder")
    return store.uri("folder")


def _manifest(store: Store) -> str:
    expected = make_folder(store, "listed")
    rows = "key,label\n" + "".join(f"{key},{i % 2}\n" for i, key in enumerate(sorted(expected)))
    return store.put("listed/labels.csv", rows.encode())


# Every way a loader decodes samples; a stored member of a downloaded .npz is instead a view of the
# download (below).
WRITERS: dict[str, tuple[str, Callable[[Store], str]]] = {
    "npz-file": ("file", _npz),
    "npz-fortran-file": ("file", lambda store: _npz(store, x=np.asfortranarray(X))),
    "npz-compressed-file": ("file", lambda store: _npz(store, compressed=True)),
    "npz-compressed-s3": ("s3", lambda store: _npz(store, compressed=True)),
    "parquet-file": ("file", _parquet),
    "parquet-s3": ("s3", _parquet),
    "image-folder-file": ("file", _folder),
    "image-folder-s3": ("s3", _folder),
    "csv-manifest-s3": ("s3", _manifest),
}


def _in_shared_memory(features: np.ndarray[Any, Any]) -> bool:
    """Whether the array lies in shared memory as it is: its shared tensor is over the same memory."""
    return bool(shared_tensor(features).data_ptr() == features.ctypes.data)


def _load(store: Store, uri: str, **options: Any) -> LoadedDataset:
    return load_dataset(uri, None, store.storage, LIMITS, **options)


@pytest.mark.parametrize("name", list(WRITERS))
def test_samples_are_decoded_where_allocate_says(name: str, root: Path, s3: S3Server) -> None:
    scheme, write = WRITERS[name]
    store = Store(root, s3, scheme)
    uri = write(store)
    private = _load(store, uri)
    shared = _load(store, uri, allocate=shared_array)
    assert not _in_shared_memory(private.features)  # np.empty by default
    assert _in_shared_memory(shared.features)
    np.testing.assert_array_equal(shared.features, private.features)
    assert shared.features.flags.writeable
    assert shared.digest == private.digest  # the same samples, wherever they lie


def test_a_downloaded_uncompressed_npz_is_a_view_of_the_download(root: Path, s3: S3Server) -> None:
    """No copy while loading; share_samples copies it to shared memory once, as it would any array."""
    store = Store(root, s3, "s3")
    dataset = _load(store, _npz(store), allocate=shared_array)
    assert not dataset.features.flags.owndata
    assert not _in_shared_memory(dataset.features)
    np.testing.assert_array_equal(shared_tensor(dataset.features).numpy(), X)


def test_big_endian_samples_reach_shared_memory_in_native_order(root: Path, s3: S3Server) -> None:
    """torch has no big-endian tensors: such an .npz (saved on another machine, say) is converted
    once when it moves to shared memory, instead of failing the job."""
    store = Store(root, s3, "file")
    dataset = _load(store, _npz(store, x=X.astype(">f4")), allocate=shared_array)
    assert dataset.features.dtype == np.dtype(">f4")
    tensor = shared_tensor(dataset.features)
    assert tensor.is_shared()
    np.testing.assert_array_equal(tensor.numpy(), X)
