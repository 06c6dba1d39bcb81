"""Where exceptions become gRPC statuses and where every call is measured, for every method.

`ServiceInterceptor` wraps each method handler (unary and streaming alike): a `ServiceError` raised
below the servicer is turned into its status with google.rpc details (`o2u_server.api.status`) and
sent with `abort_with_status`; any other exception is logged with the job id and becomes INTERNAL. The
final code of every call, including aborts by other interceptors and client cancellations, is
counted in o2u_grpc_requests_total{method,code} and its duration observed in
o2u_grpc_request_duration_seconds{method}.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, NoReturn, TypeAlias

import grpc

from o2u_server.api.status import grpc_code, grpc_status
from o2u_server.errors import Internal, ServiceError
from o2u_server.metrics import ServerMetrics

__all__ = ["ServiceInterceptor"]

logger = logging.getLogger(__name__)

# grpc-stubs types handlers for the synchronous server; the aio context is what they receive here.
Context = Any
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


def _code_name(context: Context) -> str:
    code = context.code()
    if code is None:
        return "OK"
    if isinstance(code, grpc.StatusCode):
        return code.name
    return next((status.name for status in grpc.StatusCode if status.value[0] == code), "UNKNOWN")


class _Call:
    """Bookkeeping of one call: its method, start time and final code."""

    def __init__(self, metrics: ServerMetrics, method: str) -> None:
        self.metrics = metrics
        self.method = method
        self.start = time.perf_counter()
        self.code: str | None = None

    def finish(self, context: Context) -> None:
        code = self.code or _code_name(context)
        self.metrics.grpc_requests.labels(method=self.method, code=code).inc()
        self.metrics.grpc_duration.labels(method=self.method).observe(time.perf_counter() - self.start)

    async def fail(self, exc: BaseException, request: object, context: Context) -> NoReturn:
        """Record and re-raise `exc` as the call's status."""
        if isinstance(exc, asyncio.CancelledError):
            self.code = "CANCELLED"
            raise exc
        if isinstance(exc, grpc.aio.AbortError):
            raise exc  # already a status (set by the handler or another interceptor)
        if isinstance(exc, ServiceError):
            error = exc
        else:
            job_id = getattr(request, "job_id", "") or ""
            logger.error("unexpected error in %s", self.method, exc_info=exc, extra={"job_id": job_id})
            error = Internal(
                f"internal error while handling {self.method}; the server logged the details",
                reason="INTERNAL",
            )
        self.code = grpc_code(error).name
        await context.abort_with_status(grpc_status(error))
        raise AssertionError("abort_with_status returned")  # pragma: no cover


class ServiceInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Maps errors to statuses and records request metrics for every method of the server."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler  # unknown method: gRPC answers UNIMPLEMENTED; not counted (unbounded names)
        method = (handler_call_details.method or "").rsplit("/", 1)[-1]
        metrics = self._metrics
        serializers = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }

        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def unary_unary(request: Any, context: Context) -> Any:
                call = _Call(metrics, method)
                try:
                    return await unary(request, context)
                except BaseException as exc:
                    await call.fail(exc, request, context)
                finally:
                    call.finish(context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, **serializers)

        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _streaming(metrics, method, handler.unary_stream),
                **serializers,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                _streaming(metrics, method, handler.stream_stream),
                **serializers,
            )
        return handler  # stream-unary: this server has none


def _streaming(
    metrics: ServerMetrics, method: str, behavior: Callable[[Any, Context], Any]
) -> Callable[[Any, Context], AsyncIterator[Any]]:
    """Wrap a response-streaming behavior: an async generator, or a coroutine that uses context.write."""

    async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
        call = _Call(metrics, method)
        try:
            result = behavior(request, context)
            if hasattr(result, "__aiter__"):
                # aclosing: the inner generator's cleanup (e.g. the watch-stream count) runs now,
                # not whenever it is garbage collected.
                async with aclosing(result) as responses:
                    async for response in responses:
                        yield response
            else:
                await result
        except BaseException as exc:
            if isinstance(exc, GeneratorExit):
                call.code = "CANCELLED"
                raise
            await call.fail(exc, request, context)
        finally:
            call.finish(context)

    return stream
