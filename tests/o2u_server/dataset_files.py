"""Dataset files for the dataset tests: small PNG/JPEG images, .npz archives, and a `Store` that puts
the same files under a local data root or into a bucket of a real S3 server (tests/s3_server.py)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from o2u_server.datasets import DatasetLimits
from o2u_server.settings import Settings
from o2u_server.storage import RetryPolicy, Storage
from tests.s3_server import S3Server

LIMITS = DatasetLimits(max_bytes=64 * 1024 * 1024, max_samples=10_000, max_image_pixels=16_777_216)
COLOURS = {"cat": (200, 30, 30), "dog": (30, 200, 30), "emu": (30, 30, 200)}
BUCKET = "datasets"


def make_storage(root: Path, s3: S3Server) -> Storage:
    """A Storage reading under `root` and from the `datasets` bucket only, exporting under their
    `exports` folder, with quick retries."""
    settings = Settings(
        data_roots=[root],
        s3_allowed_buckets=[BUCKET],
        export_uris=[f"file://{root}/exports", f"s3://{BUCKET}/exports"],
        **s3.settings_kwargs(),
    )
    return Storage(settings, retry=RetryPolicy(attempts=2, base_delay_seconds=0.05))


def png(pixels: np.ndarray[Any, Any], image_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=image_format)
    return buffer.getvalue()


def solid(colour: tuple[int, int, int], index: int, size: tuple[int, int] = (6, 5)) -> np.ndarray[Any, Any]:
    """A (height, width, 3) image of one colour with a marker pixel telling samples apart."""
    pixels = np.empty((size[1], size[0], 3), dtype=np.uint8)
    pixels[:] = colour
    pixels[0, 0] = index
    return pixels


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height RGB pixels."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + chunk(b"IEND", b"")
    )


class Store:
    """Puts files under the local root or into the bucket (per `scheme`) and names them by URI."""

    def __init__(self, root: Path, s3: S3Server, scheme: str) -> None:
        self.root, self.s3, self.scheme = root, s3, scheme
        self.storage = make_storage(root, s3)

    def put(self, key: str, data: bytes) -> str:
        if self.scheme == "s3":
            self.s3.put(BUCKET, key, data)
            return f"s3://{BUCKET}/{key}"
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return f"file://{path}"

    def uri(self, key: str) -> str:
        return f"s3://{BUCKET}/{key}" if self.scheme == "s3" else f"file://{self.root / key}"


def npz_bytes(compressed: bool = False, **arrays: Any) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return buffer.getvalue()


def make_folder(store: Store, prefix: str, per_class: int = 2) -> dict[str, np.ndarray[Any, Any]]:
    expected = {}
    for name, colour in COLOURS.items():
        for index in range(per_class):
            key = f"{name}/{index:02d}.png"
            expected[key] = solid(colour, index)
            store.put(f"{prefix}/{key}", png(expected[key]))
    store.put(f"{prefix}/README.txt", b"not a sample")
    store.put(f"{prefix}/cat/notes.txt", b"not an image")
    return expected


# ---- .npz -------------------------------------------------------------------------------------------
