"""Fixtures of the server tests: labelled datasets under a data root, and real servers on loopback
ports (see tests/server_testing.py for the server helper other test suites can reuse)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from o2u.v1 import scoring_pb2 as pb
from o2u.v1 import scoring_pb2_grpc
from tests.o2u_server.dataset_files import BUCKET
from tests.postgres_server import PostgresServer, require_postgres, running_postgres
from tests.s3_server import S3Server, running_s3_server
from tests.server_testing import (
    RunningServer,
    create_job,
    running_server,
    test_settings,
    wait_for_job,
    write_noisy_blobs,
    write_noisy_digits,
)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def digits_flipped(data_root: Path) -> np.ndarray:
    """Sample ids whose labels were flipped in digits.npz."""
    return write_noisy_digits(data_root / "digits.npz")


@pytest.fixture(scope="session")
def digits_uri(data_root: Path, digits_flipped: np.ndarray) -> str:
    return (data_root / "digits.npz").as_uri()


@pytest.fixture(scope="session")
def blobs_uri(data_root: Path) -> str:
    write_noisy_blobs(data_root / "blobs.npz")
    return (data_root / "blobs.npz").as_uri()


@pytest.fixture
def start_server(
    data_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., RunningServer]]:
    """Factory: start(**settings_overrides) -> a running server with a fresh state folder
    (pass state_dir=... to reuse one); every server is stopped when the test ends."""
    with ExitStack() as stack:

        def start(**overrides: Any) -> RunningServer:
            overrides.setdefault("state_dir", tmp_path_factory.mktemp("state"))
            settings = test_settings(data_roots=[data_root], **overrides)
            return stack.enter_context(running_server(settings))

        yield start


@pytest.fixture(scope="module")
def server(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A server shared by the tests of one module."""
    settings = test_settings(
        state_dir=tmp_path_factory.mktemp("state"),
        data_roots=[data_root],
        export_uris=[f"file://{data_root}/exports"],
        default_page_size=100,
        max_page_size=150,
    )
    with running_server(settings) as running:
        yield running


@pytest.fixture(scope="module")
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    with server.channel() as opened:
        yield opened


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> scoring_pb2_grpc.ScoringServiceStub:
    return scoring_pb2_grpc.ScoringServiceStub(channel)


@pytest.fixture(scope="module")
def finished_job(stub: scoring_pb2_grpc.ScoringServiceStub, digits_uri: str) -> pb.ScoringJob:
    """A digits job on the module's server that ran to SUCCEEDED."""
    job = create_job(stub, digits_uri, display_name="digits")
    job = wait_for_job(stub, job.job_id)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    return job


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    """A real S3-compatible server (moto) for one test module."""
    with running_s3_server() as server:
        yield server


@pytest.fixture
def root(tmp_path: Path, s3: S3Server) -> Path:
    """An empty data root, with the S3 server emptied and its dataset bucket created."""
    s3.reset()
    s3.make_bucket(BUCKET)
    (tmp_path / "root").mkdir()
    return tmp_path / "root"


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL cluster for the whole session (skipped without the binaries, except in CI);
    tests take a fresh database each with `postgres.new_database()`."""
    binaries = require_postgres()
    with running_postgres(binaries) as server:
        yield server
