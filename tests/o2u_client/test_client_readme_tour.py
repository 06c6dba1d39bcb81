"""The README's five-minute tour, run as written: its code blocks are read from README.md, the
server is started by the tour's own command line, each CLI line runs in bash, the Python snippet
in a fresh interpreter and the Go block builds and runs the example, all in a folder laid out like
the repository after `make demo` (the demo's noisy digits in demo-data/, a copy of the Go module
in client/go).

Only what the reader is told to fill in is substituted: JOB_ID, URI, the example webhook receiver
and the Python snippet's dataset; the fixed port 50051 and the Go block's /tmp folders become ones
of the test's own (the CLI finds the server through O2U_TARGET). The Go block skips without a Go
toolchain, except in CI, where it fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from o2u_client.demo import write_noisy_digits
from tests.webhook_receiver import SECRET, Receiver, serve_receiver

ROOT = Path(__file__).resolve().parents[2]
README_ADDRESS = "127.0.0.1:50051"
DEMO_SAMPLES = 1797  # scikit-learn's digits, all of which the demo writes
EXAMPLE_RECEIVER = "https://hooks.example.com/o2u/ci"
README_SCRATCH = ("/tmp/gopath", "/tmp/o2u-example")  # the Go block's build folders, moved under the test's


def _tour_blocks() -> list[tuple[str, str]]:
    """(language, text) of each fenced code block of the README's tour section."""
    readme = (ROOT / "README.md").read_text()
    tour = readme.split("## Five-minute tour", 1)[1].split("### Datasets", 1)[0]
    return re.findall(r"```(\w+)\n(.*?)```", tour, flags=re.DOTALL)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Tour:
    home: Path  # the tour's $PWD
    address: str
    env: dict[str, str]
    receiver: Receiver
    blocks: list[tuple[str, str]]

    def substitute(self, text: str) -> str:
        text = text.replace(README_ADDRESS, self.address)
        for scratch in README_SCRATCH:
            text = text.replace(scratch, f"{self.home}{scratch}")
        return text

    def bash(
        self, script: str, *, timeout: float = 180, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`script` as the reader would run it (after substitute()); it must exit 0."""
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", self.substitute(script)],
            cwd=self.home,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert result.returncode == 0, f"{script}\nexit {result.returncode}\n{result.stdout}\n{result.stderr}"
        return result


def test_the_tour_has_the_blocks_this_test_runs() -> None:
    assert [language for language, _ in _tour_blocks()] == ["bash", "bash", "python", "bash"]


@pytest.fixture(scope="module")
def tour(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tour]:
    """The tour's server, started by the README's own command line in a repository-like folder."""
    home = tmp_path_factory.mktemp("tour")
    write_noisy_digits(home / "demo-data", noise_rate=0.2, seed=0)  # what `make demo` leaves
    # A copy of the Go module, so that whatever the Go block does to it stays in the test's folder.
    shutil.copytree(ROOT / "client" / "go", home / "client" / "go")
    (home / "tmp").mkdir()
    secret = home / "webhook-secret"
    secret.write_bytes(SECRET)
    blocks = _tour_blocks()
    activate, start = blocks[0][1].strip().splitlines()
    assert activate.startswith("source .venv/bin/activate")
    assert start.endswith(" &"), "the tour starts the server in the background"
    address = f"127.0.0.1:{_free_port()}"
    with serve_receiver() as receiver:
        env = {
            **os.environ,
            # What activating the environment does; the test runs in that environment already.
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "O2U_TARGET": address,
            "O2U_METRICS_PORT": str(_free_port()),
            "O2U_CPU_THREADS": "1",
            # The webhook line needs a receiver the operator allowed; here a loopback one.
            "O2U_WEBHOOK_ALLOWED_URLS": receiver.url,
            "O2U_WEBHOOK_SECRET_FILE": str(secret),
            "O2U_WEBHOOK_ALLOW_HTTP_LOOPBACK": "true",
        }
        state = Tour(home=home, address=address, env=env, receiver=receiver, blocks=blocks)
        log = (home / "server.log").open("wb")
        server = subprocess.Popen(
            ["bash", "-c", state.substitute(start.removesuffix(" &"))],
            cwd=home,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            _wait_serving(address, server, home / "server.log")
            yield state
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
            log.close()


def _wait_serving(address: str, server: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if server.poll() is not None:
                pytest.fail(f"the tour's server exited {server.returncode}:\n{log.read_text()}")
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    pytest.fail(f"the tour's server did not serve within {timeout} s:\n{log.read_text()}")


def test_the_cli_lines_run_as_written(tour: Tour) -> None:
    lines = [line.split("#", 1)[0].strip() for line in tour.blocks[1][1].splitlines()]
    lines = [line for line in lines if line]
    assert lines[0].startswith("o2u score "), "the tour's first CLI line submits the job the rest use"
    scored = tour.bash(lines[0])
    assert "Top 10 suspects" in scored.stdout
    assert f"of {DEMO_SAMPLES:,} samples suspected" in scored.stdout
    jobs = [json.loads(row) for row in tour.bash("o2u jobs --json").stdout.splitlines()]
    (job_id,) = [job["job_id"] for job in jobs]
    uri = (tour.home / "demo-data" / "digits_noisy.npz").as_uri()

    ran = [lines[0]]
    for line in lines[1:]:
        filled = re.sub(
            r"\bURI\b", uri, line.replace("JOB_ID", job_id).replace(EXAMPLE_RECEIVER, tour.receiver.url)
        )
        ran.append(line)
        output = tour.bash(filled).stdout
        if line == "o2u jobs":
            assert job_id in output
        elif line.startswith("o2u summary"):
            assert "estimated noise rate" in output
            assert "Most confused" in output

    assert len(ran) == 6, ran
    suspects = [json.loads(row) for row in (tour.home / "suspects.jsonl").read_text().splitlines()]
    assert suspects
    assert all(score["suspected"] for score in suspects)
    exported = (tour.home / "exports" / "scores.csv").read_text().splitlines()
    assert exported[0].startswith("rank,sample_id,key,score")
    assert len(exported) == DEMO_SAMPLES + 1
    deadline = time.monotonic() + 30
    while not tour.receiver.received and time.monotonic() < deadline:
        time.sleep(0.1)
    assert tour.receiver.received, "the webhook line's job notified no receiver"


def test_the_python_snippet_runs_as_written(tour: Tour) -> None:
    snippet = tour.blocks[2][1]
    placeholder = "file:///data/batch-0427.npz"
    assert placeholder in snippet
    uri = (tour.home / "demo-data" / "digits_noisy.npz").as_uri()
    result = subprocess.run(
        [sys.executable, "-c", tour.substitute(snippet).replace(placeholder, uri)],
        cwd=tour.home,
        env=tour.env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"estimated label accuracy: \d+\.\d%", lines[-1])
    ranked = [line for line in lines if re.match(r"\d+ digit-\d{4} \d -> \d ", line)]
    assert [int(line.split()[0]) for line in ranked] == list(range(1, 21))


def test_the_go_block_builds_and_runs_the_example(
    tour: Tour, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from tests.go.test_go_client import _require_go, go_build_cache

    _require_go()
    go_env = {"GOCACHE": str(go_build_cache(tmp_path_factory)), "GOPROXY": "off"}
    lines = tour.bash(tour.blocks[3][1], timeout=300, env=go_env).stdout.splitlines()
    assert any(line.startswith(f"{DEMO_SAMPLES} samples, 10 classes, model mlp") for line in lines), lines
    assert "top 10 suspects:" in lines
    # The block may run again: its link to the module is replaced, not nested inside it.
    tour.bash(tour.blocks[3][1], timeout=300, env=go_env)
    assert not (tour.home / "client" / "go" / "go").exists()
