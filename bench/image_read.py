"""Image read benchmark: how fast the server turns an image folder or a manifest into the resident
uint8 tensor, from S3 (cold, then warm from the ETag-keyed object cache) and from local files.

It writes `--images` (2,000) CIFAR-sized 32x32 RGB PNGs in 10 class folders plus a `key,label` CSV
manifest of the same files, uploads both to a real S3 server (moto, in a subprocess on loopback, as in
the tests) and times `o2u_server.datasets.load_dataset` - listing, concurrent download, header checks,
decoding into one array - for each source (s3, file) and format (image_folder, csv_manifest). A cold
read uses a fresh `Storage` (an empty object cache, as after a server start); the warm read repeats
it on the same `Storage`, so every object is served from the cache by (URI, ETag) after one listing.
Local files have no object cache and sit in the OS page cache from being written, so their two reads
measure the same thing. Each figure is the median of `--repeats` (3) reads, and every read must return
exactly the generated pixels and labels. Usage: `python bench/image_read.py [--images 2000] [--quick]`.
"""

from __future__ import annotations

import argparse
import csv
import io
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from common import format_table, machine_description, synthetic_images
from PIL import Image

from o2u_server.datasets import DatasetLimits, LoadedDataset, load_dataset
from o2u_server.domain import DatasetFormat
from o2u_server.settings import Settings
from o2u_server.storage import Storage

NUM_CLASSES = 10
SIZE = 32  # pixels
BUCKET = "datasets"
PREFIX = "images"
MB = 1e6


@dataclass
class Dataset:
    """The generated images, by key (`class-k/img-nnnnn.png`, relative to the folder)."""

    images: dict[str, np.ndarray]  # key -> (SIZE, SIZE, 3) uint8
    labels: dict[str, int]  # key -> class index
    files: dict[str, bytes]  # path relative to the folder -> encoded bytes (PNGs and manifest.csv)

    @property
    def image_bytes(self) -> int:
        return sum(len(data) for name, data in self.files.items() if name.endswith(".png"))


@dataclass
class Case:
    source: str  # "s3" or "file"
    fmt: str  # "image_folder" or "csv_manifest"
    uri: str


def make_dataset(count: int, seed: int = 0) -> Dataset:
    pixels, labels = synthetic_images(count, NUM_CLASSES, seed=seed, size=SIZE)  # (N, 32, 32, 3) uint8
    dataset = Dataset({}, {}, {})
    for index, (image, label) in enumerate(zip(pixels, labels, strict=True)):
        key = f"class-{label}/img-{index:05d}.png"
        buffer = io.BytesIO()
        Image.fromarray(image, "RGB").save(buffer, format="PNG")
        dataset.images[key], dataset.labels[key], dataset.files[key] = image, int(label), buffer.getvalue()
    manifest = io.StringIO()
    writer = csv.writer(manifest, lineterminator="\n")
    writer.writerow(["key", "label"])
    writer.writerows(dataset.labels.items())
    dataset.files["manifest.csv"] = manifest.getvalue().encode()
    return dataset


def check(loaded: LoadedDataset, dataset: Dataset, case: Case) -> None:
    """The loaded tensor must hold exactly the generated pixels and labels, in the order of its keys."""
    expected = np.stack([dataset.images[key] for key in loaded.keys])  # (N, 32, 32, 3)
    names = [loaded.class_names[label] for label in loaded.labels]
    given = [
        f"class-{dataset.labels[key]}" if case.fmt == "image_folder" else str(dataset.labels[key])
        for key in loaded.keys
    ]
    if len(loaded.keys) != len(dataset.images) or not np.array_equal(loaded.features, expected):
        raise AssertionError(f"{case.source} {case.fmt}: the pixels differ from the generated images")
    if names != given:
        raise AssertionError(f"{case.source} {case.fmt}: the labels differ from the generated ones")


def time_case(
    case: Case, settings: Settings, dataset: Dataset, repeats: int
) -> tuple[list[float], list[float], int, int]:
    """(cold seconds, warm seconds, bytes a cold read downloads, bytes a warm read downloads)."""
    limits = DatasetLimits.from_settings(settings)
    cold: list[float] = []
    warm: list[float] = []
    downloaded = [0, 0]
    for _ in range(repeats):
        storage = Storage(settings)  # an empty object cache, as after a server start
        for index, timings in enumerate((cold, warm)):
            start = time.perf_counter()
            loaded = load_dataset(case.uri, DatasetFormat(case.fmt), storage, limits)
            timings.append(time.perf_counter() - start)
            downloaded[index] = loaded.bytes_read
            check(loaded, dataset, case)
    return cold, warm, downloaded[0], downloaded[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="images to generate (default 2000)")
    parser.add_argument("--repeats", type=int, default=3, help="reads per figure, median (default 3)")
    parser.add_argument("--quick", action="store_true", help="500 images, one read each")
    args = parser.parse_args(argv)
    count, repeats = (500, 1) if args.quick else (args.images, args.repeats)
    # The S3 test server lives with the tests, one folder above this script.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.s3_server import running_s3_server

    print(f"machine: {machine_description()}")
    dataset = make_dataset(count)
    total_mb = sum(len(data) for data in dataset.files.values()) / MB
    print(f"dataset: {count} PNGs {SIZE}x{SIZE} RGB in {NUM_CLASSES} class folders + manifest.csv, ", end="")
    print(f"{total_mb:.2f} MB encoded, {count * SIZE * SIZE * 3 / MB:.2f} MB decoded")
    rows: list[list[Any]] = []
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="o2u-image-read-") as tmp, running_s3_server() as s3:
        folder = Path(tmp) / "data" / PREFIX
        for name, data in dataset.files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
        s3.make_bucket(BUCKET)
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda item: s3.put(BUCKET, f"{PREFIX}/{item[0]}", item[1]), dataset.files.items()))
        print(f"uploaded {len(dataset.files)} objects to moto in {time.perf_counter() - start:.1f} s")
        settings = Settings(
            data_roots=[folder.parent],
            state_dir=Path(tmp) / "state",
            s3_allowed_buckets=[BUCKET],
            **s3.settings_kwargs(),
        )
        listings = []
        for _ in range(repeats):  # what even a warm S3 read pays: one listing of the folder
            start = time.perf_counter()
            list(Storage(settings).iter_objects(f"s3://{BUCKET}/{PREFIX}/"))
            listings.append(time.perf_counter() - start)
        print(f"listing {len(dataset.files)} objects from moto: {statistics.median(listings):.3f} s (median)")
        cases = [
            Case("s3", "image_folder", f"s3://{BUCKET}/{PREFIX}/"),
            Case("s3", "csv_manifest", f"s3://{BUCKET}/{PREFIX}/manifest.csv"),
            Case("file", "image_folder", folder.as_uri()),
            Case("file", "csv_manifest", (folder / "manifest.csv").as_uri()),
        ]
        for case in cases:
            cold, warm, cold_bytes, warm_bytes = time_case(case, settings, dataset, repeats)
            read_mb = (
                dataset.image_bytes + (len(dataset.files["manifest.csv"]) if "manifest" in case.fmt else 0)
            ) / MB
            for name, timings, downloaded in (("cold", cold, cold_bytes), ("warm", warm, warm_bytes)):
                seconds = statistics.median(timings)
                figures[f"{case.source}_{case.fmt.split('_')[-1]}_{name}"] = count / seconds
                spread = f"{min(timings):.3f}-{max(timings):.3f}"
                ips, mbps = count / seconds, read_mb / seconds
                rows.append(
                    [case.source, case.fmt, name, seconds, f"{ips:,.0f}", mbps, downloaded / MB, spread]
                )
            print(f"{case.source} {case.fmt}: done", flush=True)
    print()
    header = ["source", "format", "read", "median s", "images/s", "MB/s", "MB downloaded", "range s"]
    print(format_table(header, rows))
    print("\nMB/s counts the encoded bytes the read delivers (PNGs, plus the manifest); MB downloaded is")
    print("what actually came from storage (the service's own bytes_read): a warm S3 read downloads only")
    print("the manifest, and every image comes from the ETag cache. Every read returned the exact pixels.")
    summary = " ".join(f"{name}_images_per_s={value:.0f}" for name, value in figures.items())
    print(f"summary: images={count} repeats={repeats} {summary} identical=true")
    return 0


if __name__ == "__main__":
    sys.exit(main())
