"""`o2u-server` as a real subprocess on a fixed loopback port and state folder, for tests that kill it
(SIGKILL: a crash) or drain it (SIGTERM) and start it again on the same state."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["GRACE_SECONDS", "ServerProcess"]

GRACE_SECONDS = 10.0


class ServerProcess:
    """`python -m o2u_server.main` on a fixed loopback port and state folder; restartable."""

    def __init__(self, state_dir: Path, data_root: Path, **settings: str) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.address = f"127.0.0.1:{probe.getsockname()[1]}"
        self.state_dir = state_dir
        self.log = state_dir.parent / f"{state_dir.name}-server.log"
        self.env = {
            **os.environ,
            "O2U_LISTEN_ADDRESS": self.address,
            "O2U_METRICS_ADDRESS": "127.0.0.1",
            "O2U_METRICS_PORT": "0",
            "O2U_STATE_DIR": str(state_dir),
            "O2U_DATA_ROOTS": str(data_root),
            "O2U_DEVICE": "cpu",
            "O2U_SHUTDOWN_GRACE_SECONDS": str(GRACE_SECONDS),
            **settings,
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            command = [sys.executable, "-m", "o2u_server.main"]
            self.process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
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

    def signal(self, signum: int) -> float:
        """Send `signum`, wait for the process to end; returns how long that took, in seconds."""
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(signum)
        code = self.process.wait(timeout=GRACE_SECONDS + 30)
        expected = -signal.SIGKILL if signum == signal.SIGKILL else 0
        assert code == expected, f"exit code {code} after signal {signum}:\n{self.log_tail()}"
        return time.monotonic() - started

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
