"""The object store going away: before a job is submitted, in the middle of a download, or going
silent mid-download. The answer is always bounded in time: UNAVAILABLE with a RetryInfo hint on
create, or the job FAILED with UNAVAILABLE and a message naming the object - never a hang.

To interrupt a download half-way the server reaches the real S3 server (moto) through a small
throttling TCP proxy that the test can cut (connections reset, port closed) or silence (connections
stay open, nothing more arrives) once part of the object has gone through.
"""

from __future__ import annotations

import functools
import io
import time
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from o2u.v1 import scoring_pb2 as pb
from o2u.v1 import scoring_pb2_grpc
from o2u_server import storage
from o2u_server.storage import RetryPolicy
from tests.o2u_server.tcp_proxy import ThrottledProxy
from tests.s3_server import S3Server, running_s3_server
from tests.server_testing import RunningServer, call_error, create_job, wait_for_job

Stub = scoring_pb2_grpc.ScoringServiceStub
BUCKET = "datasets"
OBJECT_BYTES = 6 * 1024 * 1024


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with running_s3_server() as server:
        server.make_bucket(BUCKET)
        rng = np.random.default_rng(0)
        buffer = io.BytesIO()
        num_samples = OBJECT_BYTES // (4 * 256)
        np.savez(
            buffer, x=rng.normal(size=(num_samples, 256)).astype(np.float32), y=np.arange(num_samples) % 3
        )
        server.put(BUCKET, "big.npz", buffer.getvalue())
        yield server


def _serving(server: RunningServer) -> bool:
    with server.channel() as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


def test_store_down_before_submit_is_unavailable_on_create(
    start_server: Callable[..., RunningServer],
) -> None:
    with running_s3_server() as doomed:
        doomed.make_bucket(BUCKET)
        doomed.put(BUCKET, "gone.npz", b"never read")
        server = start_server(s3_allowed_buckets=[BUCKET], **doomed.settings_kwargs())
        doomed.stop()
        with server.channel() as channel:
            stub = Stub(channel)
            started = time.monotonic()
            error = call_error(lambda: create_job(stub, f"s3://{BUCKET}/gone.npz"))
            elapsed = time.monotonic() - started
            assert error.code == grpc.StatusCode.UNAVAILABLE, error
            assert f"s3://{BUCKET}/gone.npz" in error.message
            assert error.retry_delay_seconds is not None
            assert elapsed < 15, f"the refusal took {elapsed:.1f} s"
            assert list(stub.ListScoringJobs(pb.ListScoringJobsRequest(), timeout=10).jobs) == []
        assert _serving(server)


@pytest.mark.parametrize("fault", ["cut", "silent"])
def test_store_lost_mid_download_fails_the_job(
    start_server: Callable[..., RunningServer], s3: S3Server, fault: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A read timeout of 3 s instead of 10: the silent store costs each attempt that long.
    monkeypatch.setattr(storage, "RetryPolicy", functools.partial(RetryPolicy, read_timeout_seconds=3.0))
    proxy = ThrottledProxy(s3.endpoint, bytes_per_second=2 * 1024 * 1024)
    try:
        settings = s3.settings_kwargs() | {"s3_endpoint": proxy.endpoint}
        server = start_server(s3_allowed_buckets=[BUCKET], **settings)
        with server.channel() as channel:
            stub = Stub(channel)
            job = create_job(stub, f"s3://{BUCKET}/big.npz")
            proxy.wait_forwarded(OBJECT_BYTES // 4, timeout=30)
            assert (
                stub.GetScoringJob(pb.GetScoringJobRequest(job_id=job.job_id)).job.state
                == pb.JOB_STATE_RUNNING
            )
            if fault == "cut":
                proxy.cut()
            else:
                proxy.silent.set()
            lost = time.monotonic()
            # Silence costs the read timeout on each attempt (3 x 3 s) plus backoff; a cut only the backoff.
            finished = wait_for_job(stub, job.job_id, timeout=60)
            elapsed = time.monotonic() - lost
        assert finished.state == pb.JOB_STATE_FAILED
        assert finished.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
        assert f"s3://{BUCKET}/big.npz" in finished.error.message
        assert elapsed < (10 if fault == "cut" else 25), f"the job took {elapsed:.1f} s to fail"
        assert _serving(server)
    finally:
        proxy.cut()
