"""Fixtures of the client tests: real o2u servers on loopback ports (tests/server_testing.py), a
small labelled dataset under their data root, a job that already ran to completion, and loopback
receivers of webhooks and of Label Studio's import API."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from o2u_client import Client, Job
from tests.label_studio_receiver import label_studio  # noqa: F401  (a fixture for the pipeline tests)
from tests.server_testing import TINY_CONFIG, RunningServer, running_server, test_settings, write_noisy_digits
from tests.webhook_receiver import receiver  # noqa: F401  (a fixture for the webhook tests)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("client-data")
    write_noisy_digits(root / "digits.npz")
    return root


@pytest.fixture(scope="session")
def dataset_uri(data_root: Path) -> str:
    return (data_root / "digits.npz").as_uri()


@pytest.fixture(scope="session")
def server(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The server shared by most client tests."""
    settings = test_settings(
        state_dir=tmp_path_factory.mktemp("client-state"),
        data_roots=[data_root],
        export_uris=[f"file://{data_root}/exports"],
    )
    with running_server(settings) as running:
        yield running


@pytest.fixture
def start_server(
    data_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., RunningServer]]:
    """Factory: start(**settings_overrides) -> a server of its own, stopped when the test ends."""
    with ExitStack() as stack:

        def start(**overrides: Any) -> RunningServer:
            overrides.setdefault("state_dir", tmp_path_factory.mktemp("client-state"))
            return stack.enter_context(running_server(test_settings(data_roots=[data_root], **overrides)))

        yield start


@pytest.fixture
def client(server: RunningServer) -> Iterator[Client]:
    with Client(server.address, timeout=20.0) as connected:
        yield connected


@pytest.fixture(scope="session")
def finished_job(server: RunningServer, dataset_uri: str) -> Job:
    """A job on the shared server that ran to SUCCEEDED."""
    with Client(server.address, timeout=20.0) as connected:
        job = connected.submit(dataset_uri, config=TINY_CONFIG, display_name="finished")
        job = connected.wait(job.job_id, timeout=180)
    assert job.state == "SUCCEEDED", job.error
    return job


@pytest.fixture
def free_port() -> int:
    """A loopback port nothing listens on (until a test binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
