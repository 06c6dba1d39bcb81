"""Storage against real files in temporary folders and a real S3 server (moto_server subprocess)."""

from __future__ import annotations

import builtins
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from o2u_server.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from o2u_server.settings import Settings
from o2u_server.storage import RetryPolicy, Stopped, Storage
from tests.s3_server import S3Server, running_s3_server

FAST_RETRY = RetryPolicy(
    attempts=3, base_delay_seconds=0.05, connect_timeout_seconds=1.0, read_timeout_seconds=5.0
)


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with running_s3_server() as server:
        for bucket in ("datasets", "exports", "other-bucket"):
            server.make_bucket(bucket)
        yield server


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "root" / "data").mkdir(parents=True)
    (tmp_path / "root" / "data" / "hello.txt").write_bytes(b"hello")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_bytes(b"secret")
    return tmp_path / "root"


@pytest.fixture
def storage(root: Path, s3: S3Server) -> Storage:
    settings = Settings(
        data_roots=[root],
        s3_allowed_buckets=["datasets", "exports"],
        export_uris=[f"file://{root}/exports", "s3://exports/run"],
        **s3.settings_kwargs(),
    )
    return Storage(settings, retry=FAST_RETRY)


@pytest.fixture
def opened_paths(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every path the code under test opens, recorded by pass-through wrappers of os.open and open."""
    paths: list[str] = []
    real_os_open, real_open = os.open, builtins.open

    def spy_os_open(path: Any, *args: Any, **kwargs: Any) -> int:
        paths.append(os.fsdecode(path))
        return real_os_open(path, *args, **kwargs)

    def spy_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, str | bytes | os.PathLike):
            paths.append(os.fsdecode(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy_os_open)
    monkeypatch.setattr(builtins, "open", spy_open)
    return paths


# ---- files under the data roots -------------------------------------------------------------------


def test_reads_a_file_under_a_root(storage: Storage, root: Path) -> None:
    assert storage.read_bytes(f"file://{root}/data/hello.txt") == b"hello"
    assert storage.read_bytes(f"file://{root}/data/hell%6F.txt") == b"hello"  # percent-decoded once
    ref = storage.parse(f"file://{root}/data/./hello.txt")
    assert ref.scheme == "file"
    assert ref.key == os.path.realpath(root / "data" / "hello.txt")


def test_symlink_that_stays_inside_a_root_is_followed(storage: Storage, root: Path) -> None:
    (root / "alias").symlink_to(root / "data")
    assert storage.read_bytes(f"file://{root}/alias/hello.txt") == b"hello"


@pytest.mark.parametrize(
    "make_uri",
    [
        lambda root: f"file://{root}/../outside/secret.txt",
        lambda root: f"file://{root}/data/../../outside/secret.txt",
        lambda root: f"file://{root}/%2e%2e/outside/secret.txt",
        lambda root: f"file://{root}/%2E%2E%2foutside%2Fsecret.txt",
        lambda root: f"file://{root}/%252e%252e/outside/secret.txt",
        lambda root: f"file://{root.parent}/outside/secret.txt",
        lambda root: "file:///etc/passwd",
        lambda root: f"file://{root}/escape/secret.txt",
        lambda root: f"file://{root}/secret-link.txt",
    ],
    ids=[
        "dotdot",
        "nested-dotdot",
        "encoded",
        "encoded-slash",
        "double-encoded",
        "outside",
        "etc",
        "dir-link",
        "file-link",
    ],
)
def test_traversal_is_denied_and_nothing_outside_is_opened(
    storage: Storage, root: Path, opened_paths: list[str], make_uri: Callable[[Path], str]
) -> None:
    (root / "escape").symlink_to(root.parent / "outside")
    (root / "secret-link.txt").symlink_to(root.parent / "outside" / "secret.txt")
    uri = make_uri(root)
    listing: Callable[[str], object] = lambda uri: list(storage.iter_objects(uri))  # noqa: E731
    for attempt in (storage.read_bytes, storage.stat, storage.open_local, listing):
        with pytest.raises(PermissionDenied) as caught:
            attempt(uri)
        assert caught.value.field == "dataset.uri"
    with pytest.raises(PermissionDenied):
        storage.create_export(uri, b"overwrite")
    assert not any("outside" in path or path == "/etc/passwd" for path in opened_paths), opened_paths
    assert (root.parent / "outside" / "secret.txt").read_bytes() == b"secret"


def test_listing_refuses_a_file_linking_outside(storage: Storage, root: Path) -> None:
    (root / "data" / "leak.txt").symlink_to(root.parent / "outside" / "secret.txt")
    with pytest.raises(PermissionDenied, match=r"leak\.txt"):
        list(storage.iter_objects(f"file://{root}/data"))


def test_a_folder_lists_in_the_order_of_its_keys_as_whole_strings(storage: Storage, root: Path) -> None:
    """The walk goes folder by folder but yields keys in plain string order ("a-b/x" before "a/x",
    "a.png" before "a/", "B" before "a"), hidden names and symlinked folders left out."""
    folder = root / "data" / "tree"
    names = ["a/x", "a-b/x", "a.png", "a/b/c", "a/b.png", "ab", "B", "é/1", "z9/10", "z9/9", "a0/x"]
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x")
    (folder / ".hidden").write_bytes(b"x")
    (folder / "a" / ".cache").mkdir()
    (folder / "a" / ".cache" / "y").write_bytes(b"x")
    (folder / "linked").symlink_to(folder / "a", target_is_directory=True)
    keys = [info.relative_key for info in storage.iter_objects(f"file://{folder}")]
    assert keys == sorted(names)


def test_the_first_file_of_a_large_folder_is_found_without_walking_the_rest(
    storage: Storage, root: Path
) -> None:
    """check_dataset_exists takes the first entry: it must not list every folder first."""
    folder = root / "data" / "large"
    for part in range(50):
        (folder / f"part-{part:02d}").mkdir(parents=True)
        for n in range(20):
            (folder / f"part-{part:02d}" / f"{n:02d}.png").write_bytes(b"x")
    listed: list[str] = []
    real_scandir = os.scandir

    def scandir(path: Any) -> Any:
        listed.append(str(path))
        return real_scandir(path)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "scandir", scandir)
        first = next(iter(storage.iter_objects(f"file://{folder}")))
    assert first.relative_key == "part-00/00.png"
    assert len(listed) == 2  # the folder and its first subfolder


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "/absolute/without/scheme",
        "file:relative/path",
        "file://relative/path",
        "file://somehost/etc/passwd",
        "file:///data/a%00b",
        "file:///data/a?b",
        "ftp://example.com/data.npz",
        "http://127.0.0.1:9000/datasets/data.npz",
        "s3://127.0.0.1:9000/datasets/data.npz",
        "s3://minio:9000/datasets/data.npz",
        "s3://user:secret@datasets/data.npz",
        "s3://Bad_Bucket/data.npz",
        "s3://ab/data.npz",
        "s3://192.168.1.10/data.npz",
        "s3://datasets",
        "s3://datasets/a/../b.npz",
    ],
)
def test_malformed_uris_are_invalid_arguments_naming_the_field(storage: Storage, uri: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        storage.parse(uri, field="dataset.uri")
    assert caught.value.field == "dataset.uri"
    assert "dataset.uri" in caught.value.message


def test_no_data_roots_means_no_files(s3: S3Server, root: Path) -> None:
    storage = Storage(Settings(**s3.settings_kwargs()))
    with pytest.raises(PermissionDenied, match="O2U_DATA_ROOTS"):
        storage.read_bytes(f"file://{root}/data/hello.txt")


def test_missing_file_is_not_found(storage: Storage, root: Path) -> None:
    with pytest.raises(NotFound) as caught:
        storage.read_bytes(f"file://{root}/data/missing.txt")
    assert caught.value.resource_type == "object"


def test_read_limit_is_enforced(storage: Storage, root: Path, s3: S3Server) -> None:
    s3.put("datasets", "limits/ten.bin", b"0123456789")
    (root / "data" / "ten.bin").write_bytes(b"0123456789")
    for uri in ("s3://datasets/limits/ten.bin", f"file://{root}/data/ten.bin"):
        assert storage.read_bytes(uri, max_bytes=10) == b"0123456789"
        with pytest.raises(ResourceExhausted, match="max_dataset_bytes"):
            storage.read_bytes(uri, max_bytes=9)


def test_exports_create_new_files_inside_the_export_folders_and_never_replace_one(
    storage: Storage, root: Path
) -> None:
    uri = f"file://{root}/exports/2024/scores.jsonl"
    assert storage.create_export(uri, b'{"a":1}\n') == 8
    with pytest.raises(AlreadyExists) as caught:
        storage.create_export(uri, b'{"a":2}\n')
    assert caught.value.reason == "DESTINATION_EXISTS"
    assert (root / "exports" / "2024" / "scores.jsonl").read_bytes() == b'{"a":1}\n'
    assert os.listdir(root / "exports" / "2024") == ["scores.jsonl"]  # no temporary file left
    (root / "exports" / "dataset.npz").write_bytes(b"a dataset someone keeps here")
    with pytest.raises(AlreadyExists):
        storage.create_export(f"file://{root}/exports/dataset.npz", b"scores")
    assert (root / "exports" / "dataset.npz").read_bytes() == b"a dataset someone keeps here"
    for outside in (f"file://{root}/data/hello.txt", f"file://{root}/data/new.csv", f"file://{root}-x/a.csv"):
        with pytest.raises(PermissionDenied) as denied:
            storage.create_export(outside, b"x")
        assert denied.value.reason == "EXPORT_NOT_ALLOWED"
    assert (root / "data" / "hello.txt").read_bytes() == b"hello"
    assert not (root / "data" / "new.csv").exists()


def test_export_destinations_that_cannot_be_files_are_invalid_not_unavailable(
    storage: Storage, root: Path
) -> None:
    (root / "exports").mkdir(exist_ok=True)
    (root / "exports" / "a-file").write_bytes(b"x")
    with pytest.raises(InvalidArgument) as caught:
        storage.create_export(f"file://{root}/exports/a-file/scores.csv", b"x")
    assert caught.value.reason == "NOT_A_FOLDER"
    with pytest.raises(InvalidArgument) as caught:
        storage.create_export(f"file://{root}/exports/{'n' * 300}.csv", b"x")
    assert caught.value.reason == "NAME_TOO_LONG"
    with pytest.raises(InvalidArgument) as caught:
        storage.read_bytes(f"file://{root}/data/{'n' * 300}.npz")
    assert caught.value.reason == "NAME_TOO_LONG"


def test_no_export_locations_means_no_exports(root: Path) -> None:
    storage = Storage(Settings(data_roots=[root]))
    with pytest.raises(PermissionDenied) as caught:
        storage.create_export(f"file://{root}/data/scores.csv", b"x")
    assert caught.value.reason == "EXPORTS_DISABLED"
    assert not (root / "data" / "scores.csv").exists()


def test_a_fifo_is_refused_at_once_never_waited_on(storage: Storage, root: Path) -> None:
    os.mkfifo(root / "data" / "pipe.npz")  # no writer will ever open it: a blocking open would hang
    uri = f"file://{root}/data/pipe.npz"
    for attempt in (storage.read_bytes, storage.open_local, storage.stat):
        with pytest.raises(InvalidArgument) as caught:
            attempt(uri)
        assert caught.value.reason == "NOT_A_FILE"
    assert [info.relative_key for info in storage.iter_objects(f"file://{root}/data")] == ["hello.txt"]


def test_job_reads_are_counted_and_stop_when_asked(storage: Storage, root: Path, s3: S3Server) -> None:
    (root / "data" / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    s3.put("datasets", "reads/big.bin", (root / "data" / "big.bin").read_bytes())
    seen: list[tuple[int, int]] = []
    job = storage.for_job(lambda: False, lambda size, files: seen.append((size, files)))
    for uri in (f"file://{root}/data/big.bin", "s3://datasets/reads/big.bin"):
        assert len(job.read_bytes(uri)) == 3 * 1024 * 1024
    assert seen[-1] == (6 * 1024 * 1024, 2)
    assert (job.reads.bytes_read, job.reads.files_read) == (6 * 1024 * 1024, 2)
    assert storage.reads.bytes_read == 0  # the shared storage counts nothing
    stopped = storage.for_job(lambda: True)
    for uri in (f"file://{root}/data/big.bin", "s3://datasets/reads/big.bin", f"file://{root}/data"):
        with pytest.raises(Stopped):
            list(stopped.iter_objects(uri)) if uri.endswith("data") else stopped.read_bytes(uri)
    assert stopped.reads.bytes_read <= 2 * 1024 * 1024  # one chunk of each file, not all of it


def test_messages_name_the_uri_the_caller_sent_not_the_resolved_path(storage: Storage, root: Path) -> None:
    (root / "alias").symlink_to(root / "data")
    uri = f"file://{root}/alias/missing.npz"
    with pytest.raises(NotFound) as caught:
        storage.read_bytes(uri)
    assert f"{root}/alias/missing.npz" in caught.value.message
    assert f"{root}/data" not in caught.value.message
    long_uri = f"file://{root}/data/" + "x" * 5000
    with pytest.raises(InvalidArgument) as too_long:
        storage.read_bytes(long_uri)
    assert (too_long.value.reason, len(too_long.value.message) < 300) == ("URI_TOO_LONG", True)


def test_non_utf8_names_are_invalid_arguments(storage: Storage, root: Path) -> None:
    (root / "data" / "cats").mkdir()
    with open(os.path.join(os.fsencode(root / "data" / "cats"), b"\xff\xfe.png"), "wb") as handle:
        handle.write(b"x")
    with pytest.raises(InvalidArgument) as caught:
        list(storage.iter_objects(f"file://{root}/data"))
    assert caught.value.reason == "INVALID_FILE_NAME"
    caught.value.message.encode("utf-8")  # the message itself is valid text
    with pytest.raises(InvalidArgument) as uri_error:
        storage.read_bytes(f"file://{root}/data/%FF.npz")
    assert uri_error.value.reason == "INVALID_URI"


# ---- the object store --------------------------------------------------------------------------


def test_reads_stats_and_lists_objects(storage: Storage, s3: S3Server) -> None:
    s3.put("datasets", "listing/a/1.bin", b"1")
    s3.put("datasets", "listing/b/22.bin", b"22")
    s3.put("datasets", "listing-not/x.bin", b"x")
    assert storage.read_bytes("s3://datasets/listing/b/22.bin") == b"22"
    info = storage.stat("s3://datasets/listing/b/22.bin")
    assert (info.uri, info.size) == ("s3://datasets/listing/b/22.bin", 2)
    assert info.etag
    listed = list(storage.iter_objects("s3://datasets/listing/"))
    assert [(item.relative_key, item.size) for item in listed] == [("a/1.bin", 1), ("b/22.bin", 2)]
    assert storage.open_local("s3://datasets/listing/a/1.bin") is None


def test_bucket_outside_the_allow_list_is_denied(storage: Storage, s3: S3Server) -> None:
    s3.put("other-bucket", "data.npz", b"x")
    with pytest.raises(PermissionDenied, match="O2U_S3_ALLOWED_BUCKETS"):
        storage.read_bytes("s3://other-bucket/data.npz")
    with pytest.raises(PermissionDenied):
        storage.create_export("s3://other-bucket/scores.csv", b"x")


def test_missing_object_and_bucket_are_not_found(s3: S3Server) -> None:
    storage = Storage(Settings(**s3.settings_kwargs()), retry=FAST_RETRY)
    with pytest.raises(NotFound) as caught:
        storage.read_bytes("s3://datasets/no/such/object.npz")
    assert caught.value.resource_type == "object"
    assert caught.value.resource_name == "s3://datasets/no/such/object.npz"
    with pytest.raises(NotFound) as caught:
        storage.stat("s3://datasets/no/such/object.npz")
    assert caught.value.resource_type == "object"
    with pytest.raises(NotFound) as caught:
        storage.read_bytes("s3://no-such-bucket/object.npz")
    assert caught.value.resource_type == "bucket"


def test_s3_uri_without_a_configured_store_is_invalid(root: Path) -> None:
    storage = Storage(Settings(data_roots=[root]))
    with pytest.raises(InvalidArgument, match="O2U_S3_ENDPOINT"):
        storage.read_bytes("s3://datasets/data.npz")


def test_exports_create_objects_under_the_export_prefix_and_never_replace_one(
    storage: Storage, s3: S3Server
) -> None:
    assert storage.create_export("s3://exports/run/scores.csv", b"key,score\n") == 10
    assert s3.get("exports", "run/scores.csv") == b"key,score\n"
    with pytest.raises(AlreadyExists) as caught:
        storage.create_export("s3://exports/run/scores.csv", b"other")
    assert caught.value.reason == "DESTINATION_EXISTS"
    assert s3.get("exports", "run/scores.csv") == b"key,score\n"
    for outside in ("s3://exports/run-old/x.csv", "s3://exports/x.csv", "s3://datasets/run/x.csv"):
        with pytest.raises(PermissionDenied) as denied:
            storage.create_export(outside, b"x")
        assert denied.value.reason == "EXPORT_NOT_ALLOWED"


def test_cache_serves_unchanged_objects_and_notices_changes(storage: Storage, s3: S3Server) -> None:
    s3.put("datasets", "cached/img.png", b"first")
    (info,) = list(storage.iter_objects("s3://datasets/cached/"))
    assert storage.read_object(info) == (b"first", False)
    assert storage.read_object(info) == (b"first", True)
    s3.put("datasets", "cached/img.png", b"second")
    (changed,) = list(storage.iter_objects("s3://datasets/cached/"))
    assert changed.etag != info.etag
    assert storage.read_object(changed) == (b"second", False)


def test_unreachable_store_is_unavailable_within_bounded_time(root: Path) -> None:
    with running_s3_server() as server:
        server.make_bucket("datasets")
        settings = Settings(data_roots=[root], export_uris=["s3://datasets"], **server.settings_kwargs())
        storage = Storage(settings, retry=FAST_RETRY)
        assert storage.create_export("s3://datasets/x.csv", b"x") == 1
        server.stop()
        for attempt in (
            lambda: storage.read_bytes("s3://datasets/data.npz"),
            lambda: list(storage.iter_objects("s3://datasets/")),
            lambda: storage.create_export("s3://datasets/y.csv", b"x"),
        ):
            started = time.monotonic()
            with pytest.raises(Unavailable) as caught:
                attempt()
            assert time.monotonic() - started < 5
            assert "after 3 tries" in caught.value.message
            assert caught.value.retry_after_seconds is not None
