"""Fixtures of the observability tests: a live o2u server on loopback, a real Prometheus scraping
it once a second with the chart's alert rules loaded, and small jobs run while it watches, with
callers polling the server (including lookups of a missing job, so error series exist)."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
import requests
import yaml
from prometheus_testing import (
    DATASET,
    JOB,
    NAMESPACE,
    Prometheus,
    chart_alert_groups,
    free_port,
    require_tool,
)

from o2u.v1 import scoring_pb2 as pb
from o2u.v1 import scoring_pb2_grpc

if TYPE_CHECKING:
    from tests.server_testing import RunningServer


@pytest.fixture(scope="session")
def rules_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rules") / "o2u-alerts.yaml"
    path.write_text(yaml.safe_dump({"groups": chart_alert_groups()}, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A server on loopback with a small dataset under its data root; no job yet."""
    # Imported here so the promtool-only tests need neither torch nor the server.
    from tests.server_testing import running_server, test_settings, write_noisy_blobs

    data_root = tmp_path_factory.mktemp("observability-data")
    write_noisy_blobs(data_root / DATASET)
    settings = test_settings(state_dir=tmp_path_factory.mktemp("observability-state"), data_roots=[data_root])
    with running_server(settings) as running:
        yield running


@pytest.fixture(scope="session")
def prometheus_or_none(
    live_server: RunningServer, rules_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus | None]:
    """Prometheus scraping the live server every second with the chart's rules, if installed.

    Started before the job runs, so it sees the counters and histograms move."""
    binary = shutil.which("prometheus")
    if binary is None:
        yield None
        return
    folder = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules_file)],
        "scrape_configs": [
            {
                "job_name": JOB,
                "static_configs": [
                    {"targets": [f"127.0.0.1:{live_server.metrics_port}"], "labels": {"namespace": NAMESPACE}}
                ],
            }
        ],
    }
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = folder / "prometheus.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    server = Prometheus(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise AssertionError(f"prometheus exited with {process.returncode}:\n{server.log_tail()}")
            try:
                if requests.get(f"{server.url}/-/ready", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"prometheus not ready after 60 s:\n{server.log_tail()}")
            time.sleep(0.2)
        server.wait_for(f'up{{job="{JOB}", namespace="{NAMESPACE}"}} == 1')
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Traffic:
    """Callers polling the server in a background thread, as clients of a busy service do:
    Get/List calls and a lookup of a missing job (NOT_FOUND) a few times a second."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="o2u-test-traffic", daemon=True)
        self.calls = 0
        self.error_codes: set[grpc.StatusCode] = set()
        self.failure: BaseException | None = None

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        if self.failure is not None:
            raise AssertionError("background calls failed") from self.failure

    def _run(self) -> None:
        try:
            while not self._stop.wait(0.2):
                self._stub.ListScoringJobs(pb.ListScoringJobsRequest(page_size=10), timeout=10)
                self.error_codes.add(self._missing_job_code())
                self.calls += 2
        except BaseException as error:  # re-raised by __exit__ in the test's thread
            self.failure = error

    def _missing_job_code(self) -> grpc.StatusCode:
        try:
            self._stub.GetScoringJob(pb.GetScoringJobRequest(job_id="job-does-not-exist"), timeout=10)
        except grpc.RpcError as error:
            code: grpc.StatusCode = error.code()
            return code
        return grpc.StatusCode.OK


@pytest.fixture(scope="session")
def scored_job(live_server: RunningServer, prometheus_or_none: Prometheus | None) -> pb.ScoringJob:
    """Two jobs run one after the other to SUCCEEDED, each watched as a stream and its scores
    read, while background traffic polls the server. The first job spans many scrapes.

    Prometheus computes rates from increases it sees between scrapes, so one job whose metrics
    all appear within a single scrape would leave every rate at zero; a service in use has
    traffic before and after each event, and so does this one."""
    from tests.server_testing import TINY_CONFIG, create_job, wait_for_job

    uri = (live_server.settings.data_roots[0] / DATASET).as_uri()
    longer = {**TINY_CONFIG, "pretrain_epochs": 6, "num_cycles": 3}
    with live_server.channel() as channel, Traffic(channel) as traffic:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        time.sleep(2)
        for config in (longer, TINY_CONFIG):
            job = create_job(stub, uri, config, display_name="observability")
            events = list(stub.WatchScoringJob(pb.WatchScoringJobRequest(job_id=job.job_id), timeout=180))
            assert events, "the watch stream returned no events"
            job = wait_for_job(stub, job.job_id, timeout=180)
            assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
            stub.ListNoiseScores(pb.ListNoiseScoresRequest(job_id=job.job_id, top_k=10), timeout=30)
            stub.GetDatasetSummary(pb.GetDatasetSummaryRequest(job_id=job.job_id), timeout=30)
            time.sleep(2)
        if prometheus_or_none is not None:
            prometheus_or_none.wait_for(f'o2u_jobs_finished_total{{job="{JOB}", state="succeeded"}} == 2')
            time.sleep(2)
    assert traffic.calls > 0
    assert traffic.error_codes, "no lookup of a missing job was answered"
    assert grpc.StatusCode.OK not in traffic.error_codes, "a missing job was found"
    return job


@pytest.fixture(scope="session")
def prometheus(prometheus_or_none: Prometheus | None, scored_job: pb.ScoringJob) -> Prometheus:
    """The Prometheus that watched `scored_job` run (skips without Prometheus, fails in CI)."""
    if prometheus_or_none is None:
        require_tool("prometheus")
    assert prometheus_or_none is not None
    return prometheus_or_none
