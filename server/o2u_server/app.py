"""Composition of the server: settings -> store, storage, runner, manager, servicer, health,
reflection, interceptors and metrics, wired in one place.

Lifecycle: `start()` serves health (NOT_SERVING) at once, then opens the store (migrating its schema),
requeues unfinished jobs, starts the workers, the webhook deliverer, the lease keeper and (on
PostgreSQL) the listener for the other replicas' notices, and only then reports SERVING.
`stop(grace)` drains: health goes NOT_SERVING, new jobs are refused with UNAVAILABLE, watch streams
end with UNAVAILABLE, running jobs are asked to checkpoint and stop (they stay in the store and
resume on the next start), and in-flight calls get up to `grace` seconds before the server closes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from o2u.v1 import scoring_pb2, scoring_pb2_grpc
from o2u_server import __version__
from o2u_server.api.certificates import not_after
from o2u_server.api.interceptors import ServiceInterceptor
from o2u_server.api.security import server_credentials
from o2u_server.api.servicer import ScoringServicer
from o2u_server.api.tenancy import principal_interceptors
from o2u_server.jobs.checkpoints import checkpoint_store
from o2u_server.jobs.database import database_url
from o2u_server.jobs.engine import Engine
from o2u_server.jobs.events import EventHub
from o2u_server.jobs.manager import JobManager
from o2u_server.jobs.notifications import Listener
from o2u_server.jobs.paging import PageTokens
from o2u_server.jobs.runner import JobRunner
from o2u_server.jobs.state_volume import StateVolume
from o2u_server.jobs.store import JobStore, Recovery
from o2u_server.jobs.webhooks import WebhookDeliverer
from o2u_server.jobs.workers import slot_devices
from o2u_server.metrics import MetricsServer, ServerMetrics
from o2u_server.settings import Settings
from o2u_server.storage import Storage

__all__ = ["SERVICE_NAME", "O2UServer", "create_server", "resolve_devices"]

logger = logging.getLogger(__name__)

SERVICE_NAME: str = scoring_pb2.DESCRIPTOR.services_by_name["ScoringService"].full_name
_HEALTH_NAMES = ("", SERVICE_NAME)
# Keepalive: the server pings each connection every KEEPALIVE_TIME_MS and closes it when a ping goes
# unanswered for KEEPALIVE_TIMEOUT_MS (gRPC's ping ack timeout is set to match; it otherwise stays at a
# minute). A vanished client's watch stream, and its max_watch_streams slot, is so released within
# about 80 s instead of hours, and quiet streams (a long epoch sends nothing) survive proxies that
# drop idle connections. Clients may ping every 20 s, with or without calls in flight.
KEEPALIVE_TIME_MS = 60_000
KEEPALIVE_TIMEOUT_MS = 20_000
MIN_CLIENT_PING_INTERVAL_MS = 20_000


def resolve_devices(settings: Settings) -> list[str]:
    """The first torch device of each worker slot: one slot per group of gpus_per_job visible GPUs
    (by default one slot with all of them), else one CPU slot (`jobs.workers.slot_devices`)."""
    cuda = torch.cuda.is_available()
    if settings.device == "cuda" and not cuda:
        raise RuntimeError("O2U_DEVICE=cuda but torch sees no CUDA device; use auto or cpu")
    return slot_devices(settings)


class O2UServer:
    """One server instance; see the module docstring for its lifecycle."""

    def __init__(self, settings: Settings, *, engine: Engine | None = None) -> None:
        self.settings = settings
        self.devices = resolve_devices(settings)
        self.metrics = ServerMetrics(version=__version__, device=self.devices[0].split(":")[0])
        self.store = JobStore(database_url(settings), retry_seconds=settings.lease_seconds)
        self.storage = Storage(settings)
        self.checkpoints = checkpoint_store(settings, self.storage.object_store)
        self.volume = StateVolume.of_server(settings, self.store.db, self.checkpoints)
        self.metrics.watch_state_volume(self.volume.free_bytes, self.volume.min_free_bytes)
        # Names this process in leases and job events: the pod's name, and the process within it.
        self.replica = f"{socket.gethostname()}/{os.getpid()}"
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]  # stubs lack aio
        self.port: int | None = None
        self._engine = engine
        self._executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="o2u-rpc")
        self._metrics_server = MetricsServer(
            self.metrics.registry, settings.metrics_address, settings.metrics_port
        )
        self._server: grpc.aio.Server | None = None
        self._runner: JobRunner | None = None
        self._manager: JobManager | None = None
        self._listener: Listener | None = None
        self._webhooks = WebhookDeliverer(settings, self.store, self.metrics)
        self._store_open = False
        self.stopped_cleanly = True  # False after a stop that left a worker running

    @property
    def metrics_port(self) -> int:
        return self._metrics_server.port

    async def start(self) -> int:
        """Start serving; returns the bound gRPC port (a free one when the address ends in :0)."""
        hub = EventHub()
        self._runner = JobRunner(
            settings=self.settings,
            store=self.store,
            storage=self.storage,
            checkpoints=self.checkpoints,
            volume=self.volume,
            metrics=self.metrics,
            hub=hub,
            devices=self.devices,
            owner=self.replica,
            server_version=__version__,
            engine=self._engine,
        )
        self._manager = JobManager(
            settings=self.settings,
            store=self.store,
            storage=self.storage,
            checkpoints=self.checkpoints,
            volume=self.volume,
            runner=self._runner,
            hub=hub,
            metrics=self.metrics,
            executor=self._executor,
        )
        self._server = server = self._grpc_server(self._manager)
        for name in _HEALTH_NAMES:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        credentials = server_credentials(self.settings, certificate_loaded=self._certificate_loaded)
        address = self.settings.listen_address
        if credentials is None:
            self.port = server.add_insecure_port(address)
        else:
            self.port = server.add_secure_port(address, credentials)
        try:
            self._metrics_server.start()
            await server.start()
            recovery, secret = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._open_store
            )
            if self.store.db.postgresql:
                runner = self._runner
                self._listener = Listener(
                    self.store.db.url,
                    on_event=hub.notify_threadsafe,
                    on_cancel=runner.cancel,
                    on_queued=runner.wake,
                )
                await asyncio.to_thread(self._listener.start)
        except BaseException:
            await self._close(grace=0)
            raise
        for state in recovery.finished:
            self.metrics.jobs_finished.labels(state=state.value).inc()
        self._runner.start()
        self._webhooks.start()
        self._manager.serve(PageTokens(secret))
        for name in _HEALTH_NAMES:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        logger.info(
            "serving",
            extra={
                "port": self.port,
                "metrics_port": self.metrics_port,
                "devices": ",".join(self.devices),
                "database": self.store.db.description,
                "replica": self.replica,
            },
        )
        return self.port

    def _grpc_server(self, manager: JobManager) -> grpc.aio.Server:
        """The gRPC server with its interceptors, limits and keepalive, serving ScoringService,
        health and reflection."""
        limit = self.settings.max_message_bytes
        server = grpc.aio.server(
            interceptors=[
                ServiceInterceptor(self.metrics, max_message_bytes=limit),
                *principal_interceptors(self.settings),
            ],
            options=[
                ("grpc.max_send_message_length", limit),
                ("grpc.max_receive_message_length", limit),
                ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
                ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
                ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
                ("grpc.keepalive_permit_without_calls", 1),
            ],
        )
        scoring_pb2_grpc.add_ScoringServiceServicer_to_server(ScoringServicer(manager), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        return server

    def _open_store(self) -> tuple[Recovery, bytes]:
        """Open and migrate the store, requeue orphaned jobs; returns them and the page token secret.

        With SQLite this process holds the state directory, so every RUNNING job was left by a crash;
        with PostgreSQL other replicas may be running theirs, so only jobs whose lease expired are."""
        self.store.open()
        self._store_open = True
        # A crash during an atomic checkpoint write leaves its temporary file behind; no worker runs
        # yet, so every *.tmp here is such a leftover (and can be as large as a model with its optimizer).
        self.checkpoints.open()
        if self.store.db.postgresql:
            recovery = self.store.claims.requeue_expired(
                time.time(), max_attempts=self.settings.max_job_attempts
            )
        else:
            recovery = self.store.claims.recover(time.time(), max_attempts=self.settings.max_job_attempts)
        # A crash between a job's final state and the removal of its checkpoints, or a job the
        # recovery above ended, leaves them behind: no worker runs yet, so sweep them now.
        swept = self.checkpoints.sweep(self.store.is_open)
        if swept:
            logger.info("removed the checkpoints of %d ended jobs", swept)
        self.metrics.count_jobs(self.store.state_counts)
        self.metrics.count_queue(self.store.queue_stats)
        if recovery.queued:
            logger.info("resuming %d unfinished jobs", len(recovery.queued))
        return recovery, self.store.page_token_secret

    async def drain(self) -> None:
        """Stop accepting work: health NOT_SERVING, new jobs UNAVAILABLE, watch streams closed."""
        await self.health.enter_graceful_shutdown()
        if self._manager is not None:
            self._manager.drain()

    def _certificate_loaded(self, chain: bytes) -> None:
        """A TLS certificate chain went into use (at start, or renewed): export its expiry."""
        try:
            self.metrics.certificate_expires(not_after(chain))
        except ValueError as error:
            logger.warning("cannot read the TLS certificate's expiry: %s", error)

    async def stop(self, grace: float | None = None) -> None:
        """Drain, let running jobs checkpoint and in-flight calls finish for up to `grace` seconds, close."""
        if self._server is None:
            return
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        await self.drain()
        await self._close(grace)

    async def _close(self, grace: float) -> None:
        server, self._server = self._server, None
        runner_stopped = True
        stops: list[Awaitable[object]] = []
        if server is not None:
            stops.append(server.stop(grace))
        if self._runner is not None:
            stops.append(asyncio.to_thread(self._runner.stop, grace))
        for result in await asyncio.gather(*stops):
            if result is False:
                runner_stopped = False
        await asyncio.to_thread(self._webhooks.stop)
        if self._listener is not None:
            await asyncio.to_thread(self._listener.stop)
        await asyncio.to_thread(self._executor.shutdown, True, cancel_futures=True)
        await asyncio.to_thread(self._metrics_server.stop)
        if not runner_stopped:
            # A worker still inside a batch holds its connection; leave the store to process exit.
            self.stopped_cleanly = False
            logger.warning("a job did not stop within %.1f s; it resumes from its last checkpoint", grace)
        elif self._store_open:
            self.store.close()
            self._store_open = False
        logger.info("stopped")


def create_server(settings: Settings, *, engine: Engine | None = None) -> O2UServer:
    """A server for `settings`; `await server.start()` binds and serves, `await server.stop()` drains."""
    return O2UServer(settings, engine=engine)
