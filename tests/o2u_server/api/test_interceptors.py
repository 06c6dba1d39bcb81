"""The service interceptor counts a failed call before the caller can see the failure.

gRPC sends an abort's status at once, while the handler is still unwinding; a caller that reads
/metrics right after its error (a test, an alert rule under load) must already find the call there.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from o2u_server.api.interceptors import ServiceInterceptor
from o2u_server.errors import FailedPrecondition
from o2u_server.metrics import ServerMetrics

METHOD = "/o2u.v1.ScoringService/GetScoringJob"
STREAM_METHOD = "/o2u.v1.ScoringService/WatchScoringJob"
UNWIND_SECONDS = 0.5  # the handler's cleanup after the abort; the count must not wait for it


async def _aborting(request: bytes, context: Any) -> bytes:
    try:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the job is not finished")
    finally:
        await asyncio.sleep(UNWIND_SECONDS)
    raise AssertionError("abort returned")


async def _raising(request: bytes, context: Any) -> bytes:
    raise FailedPrecondition("the job is not finished", reason="JOB_NOT_FINISHED")


async def _aborting_stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
    yield b"first"
    try:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the job is not finished")
    finally:
        await asyncio.sleep(UNWIND_SECONDS)


async def _call(channel: grpc.aio.Channel, method: str) -> None:
    if method == STREAM_METHOD:
        async for _ in channel.unary_stream(method, None, None)(b""):
            pass
    else:
        await channel.unary_unary(method, None, None)(b"")


async def _first_code(
    metrics: ServerMetrics, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
) -> float | None:
    """Serve `handlers` behind the interceptor, call the first one, and return how many
    FAILED_PRECONDITION calls /metrics shows the moment the caller has its error."""
    server = grpc.aio.server(interceptors=[ServiceInterceptor(metrics, max_message_bytes=1 << 20)])
    service = grpc.method_handlers_generic_handler(
        "o2u.v1.ScoringService", {name.rsplit("/", 1)[1]: handler for name, handler in handlers.items()}
    )
    server.add_generic_rpc_handlers((service,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            method = next(iter(handlers))
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await _call(channel, method)
            assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            label = method.rsplit("/", 1)[1]
            return metrics.registry.get_sample_value(
                "o2u_grpc_requests_total", {"method": label, "code": "FAILED_PRECONDITION"}
            )
    finally:
        await server.stop(None)


@pytest.mark.parametrize(
    "handlers",
    [
        {METHOD: grpc.unary_unary_rpc_method_handler(_aborting)},
        {METHOD: grpc.unary_unary_rpc_method_handler(_raising)},
        {STREAM_METHOD: grpc.unary_stream_rpc_method_handler(_aborting_stream)},
    ],
    ids=["handler-aborts", "service-error", "stream-aborts"],
)
def test_a_failed_call_is_counted_before_the_caller_sees_it(
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]],
) -> None:
    metrics = ServerMetrics(version="test", device="cpu")
    assert asyncio.run(_first_code(metrics, handlers)) == 1.0
    # ...and counted once, with no other code, after the handler has unwound too.
    method = next(iter(handlers)).rsplit("/", 1)[1]
    samples = [
        sample
        for family in metrics.registry.collect()
        if family.name == "o2u_grpc_requests"
        for sample in family.samples
        if sample.name == "o2u_grpc_requests_total" and sample.labels["method"] == method and sample.value
    ]
    assert [(sample.labels["code"], sample.value) for sample in samples] == [("FAILED_PRECONDITION", 1.0)]
