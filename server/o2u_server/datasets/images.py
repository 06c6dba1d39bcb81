"""Reading a list of image files into one uint8 array, with limits checked before decoding.

Images are read concurrently (a small thread pool with a bounded window of requests in flight) and
each one's header is parsed as soon as it arrives, so an image whose declared width x height passes
`max_image_pixels` - a decompression bomb - is refused before a single pixel is decoded. Then, once
the decoded size has passed `max_decoded_bytes`, every image is decoded into one array from `allocate`
(shared memory when other processes train on it):

- mode: the majority of the images' modes, grayscale (`L`) or colour (`RGB`; ties go to colour);
  the minority is converted;
- size: the most common (width, height) among the images (ties: the first in key order); other
  images are resized to it with bilinear filtering;
- result: (N, H, W) for grayscale, (N, H, W, 3) for colour, uint8.

Only PNG and JPEG are decoded; anything else, or a truncated file, is InvalidArgument naming its key.
"""

from __future__ import annotations

import io
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from o2u_server.datasets.dataset import Allocate
from o2u_server.errors import InvalidArgument, ResourceExhausted
from o2u_server.storage import ObjectInfo, Storage

__all__ = ["ImageHeader", "ImageItem", "decode_image", "load_images", "probe_image"]

T = TypeVar("T")
R = TypeVar("R")
IMAGE_FORMATS = ("PNG", "JPEG")  # what Pillow may decode
WORKERS = 8
_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


@dataclass(frozen=True)
class ImageItem:
    """One image to read: where it is and the sample key that names it in errors."""

    info: ObjectInfo
    key: str


@dataclass(frozen=True)
class ImageHeader:
    width: int
    height: int
    mode: str  # "L" or "RGB": what the image is converted to unless the dataset's majority differs


def _open(data: bytes, key: str, *, field: str, max_pixels: int) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise _too_many_pixels(key, str(error), max_pixels=max_pixels) from error
    except UnidentifiedImageError as error:  # its message names an in-memory stream's address
        size = f"{len(data)} bytes" if data else "empty"
        raise _invalid(key, field, f"neither format's signature ({size})") from error
    except Exception as error:  # untrusted bytes: any decoder failure means a bad file, not a server bug
        raise _invalid(key, field, error) from error
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise _too_many_pixels(key, f"{width}x{height} = {width * height} pixels", max_pixels=max_pixels)
    if width == 0 or height == 0:
        image.close()
        raise InvalidArgument(
            f"image {key!r} has no pixels ({width}x{height})", reason="INVALID_IMAGE", field=field
        )
    return image


def _too_many_pixels(key: str, detail: str, *, max_pixels: int) -> ResourceExhausted:
    return ResourceExhausted(
        f"image {key!r} is too large ({detail}); max_image_pixels (O2U_MAX_IMAGE_PIXELS) is {max_pixels}",
        reason="IMAGE_TOO_LARGE",
        metadata={"limit": "max_image_pixels", "key": key},
    )


def _invalid(key: str, field: str, error: Exception | str) -> InvalidArgument:
    return InvalidArgument(
        f"image {key!r} is not a readable PNG or JPEG file: {error}",
        reason="INVALID_IMAGE",
        field=field,
        metadata={"key": key},
    )


def probe_image(data: bytes, key: str, *, field: str, max_pixels: int) -> ImageHeader:
    """Size and target mode from the header alone; nothing is decoded."""
    with _open(data, key, field=field, max_pixels=max_pixels) as image:
        width, height = image.size
        return ImageHeader(width, height, "L" if image.mode in _GRAY_MODES else "RGB")


def decode_image(
    data: bytes, key: str, *, field: str, max_pixels: int, mode: str, size: tuple[int, int]
) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """Decode to `mode` ("L" or "RGB") at `size` (width, height): (H, W) or (H, W, 3) uint8."""
    with _open(data, key, field=field, max_pixels=max_pixels) as image:
        try:
            image.load()
            converted: Image.Image = image
            if converted.mode in ("P", "PA"):
                converted = converted.convert("RGBA")  # palette transparency must go through RGBA
            if converted.mode != mode:
                converted = converted.convert(mode)
            if converted.size != size:
                converted = converted.resize(size, Image.Resampling.BILINEAR)
            return np.asarray(converted, dtype=np.uint8)
        except Exception as error:  # truncated or corrupt data surfaces only while decoding
            raise _invalid(key, field, error) from error


def _bounded_map(executor: ThreadPoolExecutor, function: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
    """executor.map in order, with at most 4 x WORKERS tasks queued (a million futures would not fit)."""
    pending: deque[Future[R]] = deque()
    try:
        for item in items:
            pending.append(executor.submit(function, item))
            if len(pending) >= 4 * WORKERS:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


def load_images(
    items: Sequence[ImageItem],
    storage: Storage,
    *,
    field: str,
    max_pixels: int,
    max_decoded_bytes: int,
    allocate: Allocate,
) -> tuple[np.ndarray[Any, np.dtype[np.uint8]], int]:
    """All images as one array (see the module docstring) and the bytes read from storage."""

    def read(item: ImageItem) -> tuple[bytes, bool, ImageHeader]:
        data, cached = storage.read_object(item.info, field=field)
        return data, cached, probe_image(data, item.key, field=field, max_pixels=max_pixels)

    executor = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="o2u-images")
    try:
        blobs: list[bytes] = []
        headers: list[ImageHeader] = []
        bytes_read = 0
        for data, cached, header in _bounded_map(executor, read, items):
            blobs.append(data)
            headers.append(header)
            bytes_read += 0 if cached else len(data)
        modes = Counter(header.mode for header in headers)
        mode = "L" if modes["L"] > modes["RGB"] else "RGB"
        size = Counter((header.width, header.height) for header in headers).most_common(1)[0][0]
        shape = (len(items), size[1], size[0]) + ((3,) if mode == "RGB" else ())
        decoded_bytes = int(np.prod(shape))
        if decoded_bytes > max_decoded_bytes:
            raise ResourceExhausted(
                f"{len(items)} images decoded at {size[0]}x{size[1]} {mode} would take {decoded_bytes} "
                f"bytes, more than max_decoded_bytes (O2U_MAX_DECODED_BYTES) = {max_decoded_bytes}",
                reason="DATASET_TOO_LARGE",
                metadata={"limit": "max_decoded_bytes"},
            )
        images = allocate(shape, np.dtype(np.uint8))

        def decode(index: int) -> None:
            storage.reads.check()  # a cancelled job stops decoding too
            images[index] = decode_image(
                blobs[index], items[index].key, field=field, max_pixels=max_pixels, mode=mode, size=size
            )
            blobs[index] = b""  # the encoded bytes are no longer needed

        for _ in _bounded_map(executor, decode, range(len(items))):
            pass  # wait for every decode; in key order, so an error names the first bad image
        return images, bytes_read
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
