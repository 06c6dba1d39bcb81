"""A real S3-compatible server for tests: `moto_server` in a subprocess on a free loopback port.

Usage, as a context manager::

    from tests.s3_server import running_s3_server

    with running_s3_server() as s3:
        s3.make_bucket("datasets")
        s3.put("datasets", "a/b.npz", payload)
        settings = Settings(**s3.settings_kwargs(), s3_allowed_buckets=["datasets"])

or as a pytest fixture, defined in the test module (one server per module keeps suites fast)::

    @pytest.fixture(scope="module")
    def s3() -> Iterator[S3Server]:
        with running_s3_server() as server:
            yield server

`S3Server` carries `endpoint` ("127.0.0.1:PORT", the form O2U_S3_ENDPOINT takes), `access_key`,
`secret_key`, `region`, a `minio` `client()` and the methods `make_bucket`, `put`, `get`, `reset` (drop
every bucket), `settings_kwargs()` (the `s3_*` Settings fields) and `stop()` (kill the server early,
e.g. to test an unreachable store). The server is always stopped when the `with` block ends.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import urllib3
from minio import Minio

__all__ = ["S3Server", "running_s3_server"]

ACCESS_KEY = "o2u-test-access"
SECRET_KEY = "o2u-test-secret-key"
REGION = "us-east-1"


def _moto_server_command() -> str:
    beside_python = Path(sys.executable).with_name("moto_server")
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("moto_server")
    if found is None:
        raise RuntimeError("moto_server not found; install the dev extras (moto[server])")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class S3Server:
    """A running moto_server and the credentials to reach it (moto accepts any credentials)."""

    endpoint: str
    process: subprocess.Popen[bytes]
    log_path: Path
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION
    _http: urllib3.PoolManager = field(
        default_factory=lambda: urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=2, read=10), retries=False
        )
    )

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def client(self) -> Minio:
        return Minio(
            self.endpoint,
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=False,
            region=self.region,
            http_client=self._http,
        )

    def settings_kwargs(self) -> dict[str, Any]:
        """The `s3_*` fields of o2u_server.settings.Settings that point at this server."""
        return {
            "s3_endpoint": self.endpoint,
            "s3_access_key": self.access_key,
            "s3_secret_key": self.secret_key,
            "s3_secure": False,
            "s3_region": self.region,
        }

    def make_bucket(self, bucket: str) -> None:
        client = self.client()
        if not client.bucket_exists(bucket):
            client.make_bucket(bucket)

    def put(self, bucket: str, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self.client().put_object(bucket, key, io.BytesIO(data), len(data), content_type=content_type)

    def get(self, bucket: str, key: str) -> bytes:
        response = self.client().get_object(bucket, key)
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def reset(self) -> None:
        """Delete every bucket and object (moto's reset API)."""
        response = self._http.request("POST", f"{self.url}/moto-api/reset")
        if response.status != 200:
            raise RuntimeError(f"moto reset answered HTTP {response.status}")

    def stop(self) -> None:
        """Stop the server now (idempotent)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def log_tail(self, limit: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-limit:]
        return ""


def _wait_until_ready(server: S3Server, deadline: float) -> None:
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"moto_server exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            response = server._http.request("GET", f"{server.url}/moto-api/")
            if response.status == 200:
                return
        except urllib3.exceptions.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"moto_server did not answer on {server.endpoint}:\n{server.log_tail()}")


@contextlib.contextmanager
def running_s3_server(*, startup_timeout: float = 30.0) -> Iterator[S3Server]:
    """Start moto_server on 127.0.0.1 at a free port, wait until it answers, yield it, stop it."""
    log_dir = Path(tempfile.mkdtemp(prefix="moto-"))
    server: S3Server | None = None
    try:
        for attempt in range(3):  # the free port can be taken between probing and binding
            port = _free_port()
            log_path = log_dir / f"moto-{port}.log"
            with open(log_path, "wb") as log:
                process = subprocess.Popen(
                    [_moto_server_command(), "-H", "127.0.0.1", "-p", str(port)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env={**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "true"},
                )
            server = S3Server(f"127.0.0.1:{port}", process, log_path)
            try:
                _wait_until_ready(server, time.monotonic() + startup_timeout)
                break
            except RuntimeError:
                server.stop()
                if attempt == 2:
                    raise
        assert server is not None
        yield server
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(log_dir, ignore_errors=True)
