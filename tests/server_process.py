"""`o2u-server` as a real process for tests that kill, pause or restart it.

Usage::

    from tests.server_process import ServerProcess

    server = ServerProcess(tmp_path / "state", data_root, O2U_CPU_THREADS="1")
    server.start()                      # returns once health answers SERVING
    with grpc.insecure_channel(server.address) as channel: ...
    server.pause(); server.resume()     # SIGSTOP / SIGCONT: a replica frozen past its lease
    server.signal(signal.SIGKILL)       # a crash; start() again to restart on the same state
    server.spawned_children()           # pids of its training workers or processes
    server.scrape()                     # its /metrics text
    server.gauge("o2u_jobs_queued")     # one unlabelled gauge of it
    server.stop()                       # always, in a finally

Settings are O2U_* environment variables given as keywords; the gRPC and metrics ports are free
loopback ports chosen once, so a restarted server keeps its address. `wrapper` is a command put in
front of the server's, which must exec it (so signals reach the server), e.g. `own_shm(size)`, a
mount namespace with a /dev/shm of that size of its own (`require_own_mounts` first).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["ServerProcess", "own_shm", "require_own_mounts"]


def own_shm(size: str) -> list[str]:
    """A `wrapper` that starts the server in a mount namespace with a /dev/shm of `size` of its own."""
    return [
        "unshare",
        "--mount",
        "sh",
        "-c",
        f'mount -t tmpfs -o size={size} tmpfs /dev/shm && exec "$@"',
        "sh",
    ]


def require_own_mounts() -> None:
    """Skip unless this process may give a child a mount namespace with a /dev/shm of its own
    (root and util-linux's unshare); fail under CI=true, which runs as root."""
    try:
        probe = subprocess.run([*own_shm("64k"), "true"], capture_output=True, timeout=30)
        reason = probe.stderr.decode(errors="replace").strip() or f"exit status {probe.returncode}"
        allowed = probe.returncode == 0
    except FileNotFoundError:
        allowed, reason = False, "unshare (util-linux) is not installed"
    if not allowed:
        message = f"a server with a /dev/shm of its own needs root and unshare: {reason}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def unlabelled_gauge(exposition: str, name: str) -> float:
    """The value of the unlabelled metric `name` in a /metrics text."""
    match = re.search(rf"^{re.escape(name)} (\S+)$", exposition, re.MULTILINE)
    assert match, f"{name} is not exported"
    return float(match[1])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class ServerProcess:
    """`python -m o2u_server.main` on a fixed loopback port and state folder; restartable."""

    def __init__(
        self, state_dir: Path, data_root: Path, *, wrapper: Sequence[str] = (), **settings: str
    ) -> None:
        self.address = f"127.0.0.1:{_free_port()}"
        self.metrics_port = _free_port()
        self.state_dir = state_dir
        self.log = state_dir.parent / f"{state_dir.name}-server.log"
        self.env = {
            **os.environ,
            "O2U_LISTEN_ADDRESS": self.address,
            "O2U_METRICS_ADDRESS": "127.0.0.1",
            "O2U_METRICS_PORT": str(self.metrics_port),
            "O2U_STATE_DIR": str(state_dir),
            "O2U_DATA_ROOTS": str(data_root),
            "O2U_DEVICE": "cpu",
            **settings,
        }
        self.wrapper = list(wrapper)  # a command that execs its arguments (the server keeps its pid)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def spawned_children(self) -> list[int]:
        """The pids of the server's child processes started with multiprocessing's spawn: its
        data-parallel workers or training processes."""
        pids: list[int] = []
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            pids += [int(pid) for pid in (task / "children").read_text().split()]
        return [pid for pid in pids if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def launch(self) -> None:
        """Start the process without waiting for it (see `wait_serving`)."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            command = [*self.wrapper, sys.executable, "-m", "o2u_server.main"]
            self.process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def wait_serving(self, timeout: float = 120) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"the server exited early:\n{self.log_tail()}"
            assert time.monotonic() < deadline, f"the server did not start:\n{self.log_tail()}"
            # A fresh channel per try: a reused one backs off for seconds after refused connections,
            # and the resumed job would be far into stage 2 before the test noticed the server.
            with grpc.insecure_channel(self.address) as channel:
                try:
                    request = health_pb2.HealthCheckRequest(service="")
                    answer = health_pb2_grpc.HealthStub(channel).Check(request, timeout=1)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
            time.sleep(0.05)

    def start(self) -> None:
        self.launch()
        self.wait_serving()

    def signal(self, signum: int, timeout: float = 60) -> float:
        """Send `signum`, wait for the process to end; returns how long that took, in seconds."""
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(signum)
        code = self.process.wait(timeout=timeout)
        expected = -signal.SIGKILL if signum == signal.SIGKILL else 0
        assert code == expected, f"exit code {code} after signal {signum}:\n{self.log_tail()}"
        return time.monotonic() - started

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def scrape(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text: str = response.read().decode()
        return text

    def gauge(self, name: str) -> float:
        """The value of the unlabelled metric `name` in its /metrics."""
        return unlabelled_gauge(self.scrape(), name)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def log_tail(self, limit: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-limit:] if self.log.exists() else ""
