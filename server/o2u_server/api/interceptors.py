"""Where exceptions become gRPC statuses and where every call is measured, for every method.

`ServiceInterceptor` wraps each method handler (unary and streaming alike): it parses the request
itself, so bytes that are not the method's message are INVALID_ARGUMENT (gRPC would answer UNKNOWN),
refuses a reply larger than max_message_bytes with RESOURCE_EXHAUSTED before sending it (instead of
a transport error after the call counted as OK), and turns a `ServiceError` raised below the
servicer into its status with google.rpc details (`o2u_server.api.status`), sent with
`abort_with_status`; any other exception is logged with the job id and becomes INTERNAL. The final
code of every call, including aborts by other interceptors and client cancellations, is counted in
o2u_grpc_requests_total{method,code} and its duration observed in
o2u_grpc_request_duration_seconds{method}, where `method` comes from a closed set: the methods this
server serves, and `unknown` for any other name a caller makes up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, NoReturn, TypeAlias

import grpc

from o2u_server.api.status import grpc_status
from o2u_server.errors import Internal, InvalidArgument, ResourceExhausted, ServiceError
from o2u_server.metrics import METHOD_LABELS, UNKNOWN_METHOD, ServerMetrics

__all__ = ["ServiceInterceptor"]

logger = logging.getLogger(__name__)

# grpc-stubs types handlers for the synchronous server; the aio context is what they receive here.
Context = Any
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


def _status_name(code: grpc.StatusCode | int | None) -> str:
    if code is None:
        return "OK"
    if isinstance(code, grpc.StatusCode):
        return code.name
    return next((status.name for status in grpc.StatusCode if status.value[0] == code), "UNKNOWN")


class _Call:
    """Bookkeeping of one call: its method, start time and final code, counted once."""

    def __init__(self, metrics: ServerMetrics, method: str) -> None:
        self.metrics = metrics
        self.method = method
        self.start = time.perf_counter()
        self.code: str | None = None
        self.counted = False

    def finish(self, context: Context) -> None:
        if self.counted:
            return
        self.counted = True
        code = self.code or _status_name(context.code())
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
        await context.abort_with_status(grpc_status(error))
        raise AssertionError("abort_with_status returned")  # pragma: no cover


class _CountingContext:
    """The servicer context as the handler below sees it: an abort, whoever calls it, counts the
    call before its status goes out. gRPC sends an abort's status at once, before the handler
    unwinds, so a caller that reads the metrics right after its error must find the call there."""

    def __init__(self, context: Context, call: _Call) -> None:
        self._context = context
        self._call = call

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> NoReturn:
        self._call.code = _status_name(code)
        self._call.finish(self._context)
        await self._context.abort(code, details, trailing_metadata)
        raise AssertionError("abort returned")  # pragma: no cover

    async def abort_with_status(self, status: grpc.Status) -> NoReturn:
        await self.abort(status.code, status.details, status.trailing_metadata)


Deserializer = Callable[[bytes], Any] | None


def _parse(deserialize: Deserializer, raw: Any, method: str) -> Any:
    """The request message of `raw` bytes; InvalidArgument if they are not one."""
    if deserialize is None:
        return raw  # a streaming request, or a handler that takes bytes
    try:
        return deserialize(raw)
    except Exception as error:  # DecodeError, or whatever a deserializer raises on garbage
        raise InvalidArgument(
            f"the request body is not a valid {method} request message ({type(error).__name__})",
            reason="MALFORMED_REQUEST",
        ) from error


def _checked(response: Any, limit: int) -> Any:
    """`response`, once it is known to fit in one message of `limit` bytes."""
    size = response.ByteSize() if hasattr(response, "ByteSize") else 0
    if size > limit:
        raise ResourceExhausted(
            f"the reply would take {size} bytes, more than max_message_bytes (O2U_MAX_MESSAGE_BYTES) = "
            f"{limit}; ask for less at once (a smaller page_size)",
            reason="RESPONSE_TOO_LARGE",
            metadata={"limit": "max_message_bytes"},
        )
    return response


class ServiceInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Parses requests, bounds replies, maps errors to statuses and records request metrics for
    every method of the server."""

    def __init__(self, metrics: ServerMetrics, *, max_message_bytes: int) -> None:
        self._metrics = metrics
        self._limit = max_message_bytes

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler  # unknown method: gRPC answers UNIMPLEMENTED before any handler runs
        method = METHOD_LABELS.get(handler_call_details.method or "", UNKNOWN_METHOD)
        metrics, limit = self._metrics, self._limit
        deserialize = handler.request_deserializer
        serializer = {"response_serializer": handler.response_serializer}

        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def unary_unary(raw: Any, grpc_context: Context) -> Any:
                call = _Call(metrics, method)
                context: Context = _CountingContext(grpc_context, call)
                request = None
                try:
                    request = _parse(deserialize, raw, method)
                    return _checked(await unary(request, context), limit)
                except BaseException as exc:
                    await call.fail(exc, request, context)
                finally:
                    call.finish(context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, **serializer)

        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _streaming(metrics, method, handler.unary_stream, deserialize, limit), **serializer
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                _streaming(metrics, method, handler.stream_stream, None, limit),
                request_deserializer=deserialize,
                **serializer,
            )
        return handler  # stream-unary: this server has none


def _streaming(
    metrics: ServerMetrics,
    method: str,
    behavior: Callable[[Any, Context], Any],
    deserialize: Deserializer,
    limit: int,
) -> Callable[[Any, Context], AsyncIterator[Any]]:
    """Wrap a response-streaming behavior: an async generator, or a coroutine that uses context.write."""

    async def stream(raw: Any, grpc_context: Context) -> AsyncIterator[Any]:
        call = _Call(metrics, method)
        context: Context = _CountingContext(grpc_context, call)
        request = None
        try:
            request = _parse(deserialize, raw, method)
            result = behavior(request, context)
            if hasattr(result, "__aiter__"):
                # aclosing: the inner generator's cleanup (e.g. the watch-stream count) runs now,
                # not whenever it is garbage collected.
                async with aclosing(result) as responses:
                    async for response in responses:
                        yield _checked(response, limit)
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
