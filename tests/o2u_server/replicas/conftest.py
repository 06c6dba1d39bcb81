"""The replicas of tests/o2u_server/replicas: one cluster for the package, revived before each test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.o2u_server.replicas.cluster import Cluster, start_cluster
from tests.postgres_server import PostgresServer
from tests.s3_server import S3Server, running_s3_server
from tests.server_testing import write_noisy_digits


@pytest.fixture(scope="package")
def digits_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All 1,797 digits with 10% of the labels flipped, and a 400-sample subset."""
    root = tmp_path_factory.mktemp("replica-data")
    write_noisy_digits(root / "digits.npz", samples=1797)
    write_noisy_digits(root / "small.npz")
    return root


@pytest.fixture(scope="package")
def replica_s3() -> Iterator[S3Server]:
    with running_s3_server() as server:
        yield server


@pytest.fixture(scope="package")
def running_cluster(
    tmp_path_factory: pytest.TempPathFactory,
    digits_root: Path,
    postgres: PostgresServer,
    replica_s3: S3Server,
) -> Iterator[Cluster]:
    cluster = start_cluster(tmp_path_factory.mktemp("replicas"), digits_root, postgres, replica_s3)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster(running_cluster: Cluster) -> Cluster:
    """The package's cluster with every replica running (a test before may have killed some)."""
    running_cluster.revive()
    return running_cluster
