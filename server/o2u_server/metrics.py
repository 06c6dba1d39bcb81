"""Prometheus metrics of one server instance, in its own registry, and the /metrics HTTP endpoint.

Each server owns a `CollectorRegistry` (with the process and platform collectors added) rather than
the global default, so several servers can run in one process, as they do in tests. Names and labels
are the operations contract (dashboards and alerts depend on them): base units, and no per-job or
per-sample labels, which would grow without bound.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from wsgiref.simple_server import WSGIServer

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from o2u.v1 import scoring_pb2
from o2u_server.domain import JobState, Progress, Stage

__all__ = ["METHOD_LABELS", "UNKNOWN_METHOD", "MetricsServer", "ServerMetrics"]

# The `method` label of the request metrics, by full gRPC method name: a closed set, so a caller
# inventing method names cannot grow /metrics (every other name is UNKNOWN_METHOD).
_SERVICES = {
    "o2u.v1.ScoringService": tuple(scoring_pb2.DESCRIPTOR.services_by_name["ScoringService"].methods_by_name),
    "grpc.health.v1.Health": ("Check", "Watch"),
    "grpc.reflection.v1alpha.ServerReflection": ("ServerReflectionInfo",),
    "grpc.reflection.v1.ServerReflection": ("ServerReflectionInfo",),
}
METHOD_LABELS: dict[str, str] = {
    f"/{service}/{method}": method for service, methods in _SERVICES.items() for method in methods
}
UNKNOWN_METHOD = "unknown"

_REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
_JOB_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400)
_EPOCH_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class _DeviceMemoryCollector(Collector):
    """o2u_device_memory_bytes, read from torch at scrape time (only registered with CUDA)."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "o2u_device_memory_bytes", "GPU memory allocated by torch tensors, in bytes", labels=["device"]
        )
        for index in range(torch.cuda.device_count()):
            family.add_metric([f"cuda:{index}"], float(torch.cuda.memory_allocated(index)))
        yield family


class _SharedMemoryCollector(Collector):
    """o2u_shared_memory_size_bytes and o2u_shared_memory_used_bytes of /dev/shm, read at scrape
    time: jobs that train in other processes (several GPUs, or the training process) keep their
    samples there, and one that does not fit fails SHARED_MEMORY_FULL. Nothing where there is none."""

    def __init__(self, path: str = "/dev/shm") -> None:
        self._path = path

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            stats = os.statvfs(self._path)
        except OSError:
            return
        size = stats.f_blocks * stats.f_frsize
        used = (stats.f_blocks - stats.f_bfree) * stats.f_frsize
        yield GaugeMetricFamily(
            "o2u_shared_memory_size_bytes",
            "Size of /dev/shm (the chart's shm.sizeLimit), in bytes",
            value=size,
        )
        yield GaugeMetricFamily(
            "o2u_shared_memory_used_bytes",
            "Bytes in use in /dev/shm, mostly the samples of jobs that train in other processes",
            value=used,
        )


class _StateVolumeCollector(Collector):
    """o2u_state_volume_free_bytes, read at scrape time: the free bytes of the fullest state folder
    (`StateVolume.free_bytes`); below min_free_state_bytes no job is claimed or accepted."""

    def __init__(self, free_bytes: Callable[[], int]) -> None:
        self._free_bytes = free_bytes

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            free = self._free_bytes()
        except OSError:
            return
        yield GaugeMetricFamily(
            "o2u_state_volume_free_bytes",
            "Free bytes on the fullest volume of the server's job state (state_dir, SQLite, checkpoints)",
            value=free,
        )


class ServerMetrics:
    """Every metric the server exports."""

    def __init__(self, *, version: str, device: str) -> None:
        self.registry = CollectorRegistry()
        self._count_lock = threading.Lock()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.registry.register(_SharedMemoryCollector())
        if torch.cuda.is_available():
            self.registry.register(_DeviceMemoryCollector())
        registry = self.registry
        self.jobs_finished = Counter(
            "o2u_jobs_finished", "Jobs that reached a final state", ["state"], registry=registry
        )
        # Read from the job store, so every replica of one database reports the same values.
        self.jobs_queued = Gauge("o2u_jobs_queued", "Jobs waiting for a worker", registry=registry)
        self.jobs_running = Gauge("o2u_jobs_running", "Jobs loading data or training", registry=registry)
        self.queue_oldest_age = Gauge(
            "o2u_queue_oldest_job_age_seconds",
            "Time the oldest queued job has waited since it was accepted (0 when none waits)",
            registry=registry,
        )
        # This replica's share of the work.
        self.jobs_running_here = Gauge(
            "o2u_replica_jobs_running", "Jobs this replica is running", registry=registry
        )
        self.worker_slots = Gauge(
            "o2u_replica_worker_slots", "Jobs this replica can run at once (its workers)", registry=registry
        )
        self.webhook_deliveries = Counter(
            "o2u_webhook_deliveries",
            "Completion webhook delivery attempts by outcome",
            ["outcome"],
            registry=registry,
        )
        for outcome in ("delivered", "http_error", "timeout", "network_error", "not_allowed"):
            self.webhook_deliveries.labels(outcome=outcome)
        self.job_store_up = Gauge(
            "o2u_job_store_up",
            "0 when this replica's last lease round failed to reach the job store, else 1",
            registry=registry,
        )
        self.job_store_up.set(1)  # while the store opens (migrations included), until a round fails
        self.state_volume_min_free = Gauge(
            "o2u_state_volume_min_free_bytes",
            "min_free_state_bytes: below it on the state volume, no job is claimed or accepted",
            registry=registry,
        )
        self._tls_expiry: Gauge | None = None  # certificate_loaded
        self.job_claims = Counter(
            "o2u_job_claims", "Job attempts this replica claimed from the queue", registry=registry
        )
        self.leases_lost = Counter(
            "o2u_job_leases_lost",
            "Attempts this replica stopped because their lease was gone (another replica took the job)",
            registry=registry,
        )
        self.training_failures = Counter(
            "o2u_training_worker_failures",
            "Attempts this replica ended because a data-parallel worker or the training process died "
            "or timed out (the job was requeued, or failed after max_job_attempts)",
            registry=registry,
        )
        self.job_duration = Histogram(
            "o2u_job_duration_seconds",
            "Time from a job's first start to its final state, in seconds",
            ["state"],
            buckets=_JOB_BUCKETS,
            registry=registry,
        )
        self.epoch_duration = Histogram(
            "o2u_epoch_duration_seconds",
            "Wall time of one training epoch",
            ["stage"],
            buckets=_EPOCH_BUCKETS,
            registry=registry,
        )
        self.training_samples = Counter(
            "o2u_training_samples", "Samples trained on, summed over epochs", ["stage"], registry=registry
        )
        self.samples_scored = Counter(
            "o2u_samples_scored", "Samples that received a final noise score", registry=registry
        )
        self.samples_per_second = Gauge(
            "o2u_training_samples_per_second",
            "Training throughput of the last finished epoch",
            registry=registry,
        )
        self.dataset_bytes_read = Counter(
            "o2u_dataset_bytes_read", "Dataset bytes read from storage", ["source"], registry=registry
        )
        self.grpc_requests = Counter(
            "o2u_grpc_requests",
            "Finished gRPC calls by method and status code",
            ["method", "code"],
            registry=registry,
        )
        self.grpc_duration = Histogram(
            "o2u_grpc_request_duration_seconds",
            "gRPC call duration (whole stream for streaming calls)",
            ["method"],
            buckets=_REQUEST_BUCKETS,
            registry=registry,
        )
        self.watch_streams = Gauge("o2u_watch_streams", "Open WatchScoringJob streams", registry=registry)
        self.build_info = Gauge(
            "o2u_build_info",
            "Build of the running server (always 1)",
            ["version", "torch_version", "device"],
            registry=registry,
        )
        self.build_info.labels(version=version, torch_version=torch.__version__, device=device).set(1)
        # Export every known series at zero from the first scrape: a series that appears with its
        # first value makes rate() miss that first job, epoch or call after a restart.
        for state in ("succeeded", "failed", "cancelled"):
            self.jobs_finished.labels(state=state)
            self.job_duration.labels(state=state)
        for stage in ("pretraining", "cyclic", "clean_retraining"):
            self.training_samples.labels(stage=stage)
            self.epoch_duration.labels(stage=stage)
        for method in scoring_pb2.DESCRIPTOR.services_by_name["ScoringService"].methods_by_name:
            self.grpc_requests.labels(method=method, code="OK")
            self.grpc_duration.labels(method=method)
        for source in ("s3", "file"):
            self.dataset_bytes_read.labels(source=source)

    def certificate_expires(self, expiry: float) -> None:
        """Export when the TLS certificate chain the server now serves expires (seconds since the
        epoch); the gauge exists only on a server with TLS, so no alert reads a plaintext server's 0
        as expired."""
        with self._count_lock:
            if self._tls_expiry is None:
                self._tls_expiry = Gauge(
                    "o2u_tls_certificate_expiry_timestamp_seconds",
                    "When the earliest certificate of the TLS chain in use expires (seconds since the epoch)",
                    registry=self.registry,
                )
        self._tls_expiry.set(expiry)

    def watch_state_volume(self, free_bytes: Callable[[], int], min_free_bytes: int) -> None:
        """Export the state volume's free bytes (read at each scrape) and the floor it must keep."""
        self.registry.register(_StateVolumeCollector(free_bytes))
        self.state_volume_min_free.set(min_free_bytes)

    def count_jobs(self, read_counts: Callable[[], Mapping[JobState, int]]) -> None:
        """Set the queued and running gauges from the store's count of jobs per state.

        Reading and setting happen under one lock: two threads refreshing at once could otherwise
        leave the older count in the gauges."""
        with self._count_lock:
            counts = read_counts()
            self.jobs_queued.set(counts[JobState.QUEUED])
            self.jobs_running.set(counts[JobState.RUNNING])

    def count_epoch(self, progress: Progress, seconds: float, num_samples: int) -> None:
        """Account for one finished epoch of `seconds` on a dataset of `num_samples`."""
        stage = progress.stage.value
        self.epoch_duration.labels(stage=stage).observe(seconds)
        # Stages 1 and 2 train on every sample; stage 3 on a split whose size only the engine knows,
        # estimated from its throughput.
        trained = (
            num_samples
            if progress.stage is not Stage.CLEAN_RETRAINING
            else progress.samples_per_second * seconds
        )
        self.training_samples.labels(stage=stage).inc(round(trained))
        self.samples_per_second.set(progress.samples_per_second)

    def count_queue(self, read_stats: Callable[[], tuple[int, float | None]]) -> None:
        """Set the queued gauge and the oldest-queued age from the store's queue (its size and the
        oldest job's create time), read under count_jobs's lock for the same reason."""
        with self._count_lock:
            queued, oldest_create_time = read_stats()
            now = time.time()
            self.jobs_queued.set(queued)
            self.queue_oldest_age.set(
                0.0 if oldest_create_time is None else max(0.0, now - oldest_create_time)
            )


class MetricsServer:
    """The /metrics HTTP server (a daemon thread from prometheus-client)."""

    def __init__(self, registry: CollectorRegistry, address: str, port: int) -> None:
        self._registry = registry
        self._address = address
        self._requested_port = port
        self._httpd: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        """Start serving; returns the bound port (a free one when the configured port is 0)."""
        self._httpd, self._thread = start_http_server(self._requested_port, self._address, self._registry)
        return int(self._httpd.server_port)

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("the metrics server is not running")
        return int(self._httpd.server_port)

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
