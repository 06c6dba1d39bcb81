"""Checkpoints between attempts: in a local folder, or in the real S3 server, one object per attempt
that the next attempt resumes from; and the settings that choose them and the database."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from o2u_server.jobs.checkpoints import LocalCheckpoints, ObjectCheckpoints, checkpoint_store
from o2u_server.jobs.database import Database, database_url
from o2u_server.jobs.store import Lease
from o2u_server.settings import Settings
from o2u_server.storage import RetryPolicy, Storage
from tests.s3_server import S3Server, running_s3_server

JOB = "job-" + "ab" * 16


def _settings(tmp_path: Path, **values: object) -> Settings:
    return Settings(state_dir=tmp_path / "state", **values)  # type: ignore[arg-type]


def _keys(s3: S3Server, bucket: str, prefix: str) -> list[str]:
    return sorted(str(o.object_name) for o in s3.client().list_objects(bucket, prefix, recursive=True))


def test_each_attempt_uploads_its_own_object_and_the_next_resumes_from_the_newest(
    tmp_path: Path, s3: S3Server
) -> None:
    s3.make_bucket("checkpoints")
    settings = _settings(tmp_path, checkpoint_uri="s3://checkpoints/team/o2u", **s3.settings_kwargs())
    store = checkpoint_store(settings, Storage(settings).object_store)
    assert isinstance(store, ObjectCheckpoints)
    assert store.shared
    store.open()
    first = Lease(JOB, 1, "replica-a")
    path = store.prepare(first)
    assert not path.exists()  # nothing to resume from yet
    path.write_bytes(b"epoch 3")  # as the engine writes it
    store.sync(first)
    store.sync(first)  # unchanged: not uploaded again
    second = Lease(JOB, 2, "replica-b")
    assert store.prepare(second).read_bytes() == b"epoch 3"
    path.write_bytes(b"epoch 7")
    store.sync(second)
    assert _keys(s3, "checkpoints", "team/o2u/") == [
        f"team/o2u/{JOB}/attempt-000001.pt",
        f"team/o2u/{JOB}/attempt-000002.pt",
    ]

    # Attempt 2 lost its lease while the job goes on: its checkpoint is the one to resume from.
    store.discard(second, resumes=True)
    assert store.prepare(Lease(JOB, 3, "replica-c")).read_bytes() == b"epoch 7"
    # Attempt 1 learns it lost its lease after the job ended: it removes only what it wrote.
    store.discard(first, resumes=False)
    assert _keys(s3, "checkpoints", "team/o2u/") == [f"team/o2u/{JOB}/attempt-000002.pt"]

    store.delete(JOB)  # the job ended
    assert _keys(s3, "checkpoints", "team/o2u/") == []
    assert not path.exists()


def test_a_sweep_deletes_the_checkpoints_of_ended_and_unknown_jobs(tmp_path: Path, s3: S3Server) -> None:
    running, ended = "job-" + "01" * 16, "job-" + "02" * 16
    local = LocalCheckpoints(tmp_path / "local")
    local.open()
    for name in (f"{running}.pt", f"{ended}.pt", f"{ended}.init.pt", "unknown.pt", "notes.txt"):
        (local.directory / name).write_bytes(b"x")
    assert local.sweep(lambda job_id: job_id == running) == 2
    assert sorted(path.name for path in local.directory.iterdir()) == [f"{running}.pt", "notes.txt"]

    s3.make_bucket("swept")
    settings = _settings(tmp_path, checkpoint_uri="s3://swept/o2u", **s3.settings_kwargs())
    shared = checkpoint_store(settings, Storage(settings).object_store)
    shared.open()
    for job_id in (running, ended):
        for attempt in (1, 2):
            lease = Lease(job_id, attempt, "replica-a")
            shared.prepare(lease).write_bytes(f"{job_id} {attempt}".encode())
            shared.sync(lease)
    s3.put("swept", "o2u/README", b"not a checkpoint")
    assert shared.sweep(lambda job_id: job_id == running) == 1
    assert _keys(s3, "swept", "o2u/") == [
        "o2u/README",
        f"o2u/{running}/attempt-000001.pt",
        f"o2u/{running}/attempt-000002.pt",
    ]


def test_staged_copies_are_dropped_at_start_but_local_checkpoints_kept(tmp_path: Path, s3: S3Server) -> None:
    staged = tmp_path / "state" / "checkpoints"
    staged.mkdir(parents=True)
    (staged / f"{JOB}.pt").write_bytes(b"copy")
    (staged / f"{JOB}.pt.x1.tmp").write_bytes(b"half")
    LocalCheckpoints(staged).open()
    assert sorted(p.name for p in staged.iterdir()) == [f"{JOB}.pt"]
    s3.make_bucket("checkpoints")
    settings = _settings(tmp_path, checkpoint_uri="s3://checkpoints", **s3.settings_kwargs())
    checkpoint_store(settings, Storage(settings).object_store).open()
    assert list(staged.iterdir()) == []


@pytest.mark.parametrize(
    ("uri", "kind", "folder"),
    [
        (None, LocalCheckpoints, "state/checkpoints"),
        ("/var/o2u-checkpoints", LocalCheckpoints, "/var/o2u-checkpoints"),
        ("file:///var/o2u-checkpoints", LocalCheckpoints, "/var/o2u-checkpoints"),
    ],
)
def test_local_checkpoint_locations(tmp_path: Path, uri: str | None, kind: type, folder: str) -> None:
    store = checkpoint_store(_settings(tmp_path, checkpoint_uri=uri), None)
    assert type(store) is kind
    assert (
        store.path(JOB) == (tmp_path / folder if not folder.startswith("/") else Path(folder)) / f"{JOB}.pt"
    )
    assert not store.shared


@pytest.mark.parametrize(
    ("uri", "message"),
    [("s3://checkpoints/o2u", "O2U_S3_ENDPOINT"), ("s3:///o2u", "names no bucket"), ("gs://b/o2u", "s3://")],
)
def test_bad_checkpoint_uris_are_refused_at_start(tmp_path: Path, uri: str, message: str) -> None:
    settings = _settings(
        tmp_path, checkpoint_uri=uri, **({"s3_endpoint": "127.0.0.1:1"} if "///" in uri else {})
    )
    with pytest.raises(ValueError, match=message):
        checkpoint_store(settings, Storage(settings).object_store)


def test_the_database_url_and_its_password_file(tmp_path: Path) -> None:
    assert database_url(_settings(tmp_path)).render_as_string() == f"sqlite:///{tmp_path}/state/jobs.sqlite3"
    secret = tmp_path / "password"
    secret.write_text("s3cr3t\n")
    url = database_url(
        _settings(tmp_path, database_url="postgresql://o2u@db:5432/jobs", database_password_file=secret)
    )
    assert (url.drivername, url.password, url.database) == ("postgresql+psycopg", "s3cr3t", "jobs")
    described = Database(url).description
    assert "s3cr3t" not in described
    assert described == "postgresql+psycopg://o2u:***@db:5432/jobs"
    with pytest.raises(ValidationError, match="postgresql://"):
        _settings(tmp_path, database_url="mysql://o2u@db/jobs")
    assert "s3cr3t" not in repr(_settings(tmp_path, database_url="postgresql://o2u:s3cr3t@db/jobs"))


def test_an_object_store_that_does_not_answer_never_fails_the_job(tmp_path: Path) -> None:
    with running_s3_server() as down:
        settings = _settings(tmp_path, checkpoint_uri="s3://checkpoints/o2u", **down.settings_kwargs())
        down.stop()
        store = checkpoint_store(settings, Storage(settings, retry=RetryPolicy(attempts=1)).object_store)
        store.open()
        lease = Lease(JOB, 2, "replica-a")
        path = store.prepare(lease)  # cannot list: the attempt starts from the beginning
        assert not path.exists()
        path.write_bytes(b"epoch 1")
        store.sync(lease)  # logged; tried again after the next epoch
        store.discard(lease, resumes=False)
        store.delete(JOB)
        assert not path.exists()
