"""Server interceptors: what every RPC of every service passes through, written once.

`GrpcServer` installs `RequestLogInterceptor` and `MetricsInterceptor` (outermost, so they record the final
status) and `ErrorMappingInterceptor` on every server (behind the OpenTelemetry one when tracing is on), before any interceptor a service adds (authentication, say).
Servicers therefore only translate messages and raise the domain errors of `serving.errors`.

An interceptor here is a `GuardInterceptor`: an async context manager around the whole call, for unary
and streaming RPCs alike, so each concern is a few lines instead of four wrappers per concern.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import grpc

from serving import metrics, request_log, tracing
from serving.errors import ServiceError, Upstream, status_for

log = logging.getLogger(__name__)

_HANDLER_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def short_method(full_method: str) -> str:
    """"/image_to_sound.v1.VisionService/DescribeScene" -> "DescribeScene" (the metrics label)."""
    return full_method.rsplit("/", 1)[-1]


class GuardInterceptor(grpc.aio.ServerInterceptor):
    """Runs every call of the server inside `self.guard(method, context)`, an async context manager.

    Streaming handlers may be async generators (ours, reflection) or coroutines that call
    `context.write` (the health servicer's Watch); both are wrapped.
    """

    def guard(self, method: str, context: grpc.aio.ServicerContext):  # pragma: no cover - abstract
        raise NotImplementedError

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED itself
            return None
        method = handler_call_details.method
        behaviour = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
        guard = self.guard

        if inspect.isasyncgenfunction(behaviour):

            async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator:
                async with guard(method, context):
                    async for item in behaviour(request, context):
                        yield item

        else:

            async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
                async with guard(method, context):
                    return await behaviour(request, context)

        factory = _HANDLER_FACTORIES[(handler.request_streaming, handler.response_streaming)]
        return factory(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _is_cancellation(exc: BaseException) -> bool:
    # A client that goes away cancels the handler's task, or closes its response generator.
    return isinstance(exc, (asyncio.CancelledError, GeneratorExit))


INTERNAL_MESSAGE = "internal error"


def internal_error(exc: BaseException, what: str) -> str:
    """Logs an unexpected failure with its traceback and returns the client-facing message: generic,
    plus a correlation id that is in the log line too, so an operator can find the details from what
    the client reports (and the exception's text, which may name files or hold data, stays in the log)."""
    error_id = uuid.uuid4().hex[:16]
    log.error("%s failed [error id %s]", what, error_id, exc_info=exc)
    return f"{INTERNAL_MESSAGE} (error id {error_id})"


_REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


def client_status(exc: BaseException, what: str) -> tuple[grpc.StatusCode, str]:
    """The status and message a client sees for `exc` (an RPC's or a failure event's): the domain
    errors' own; for anything unexpected INTERNAL with a generic message and a logged correlation id."""
    code, message = status_for(exc)
    if code == grpc.StatusCode.INTERNAL and not isinstance(exc, (ServiceError, grpc.aio.AioRpcError)):
        message = internal_error(exc, what)
    elif code in _REFUSED and isinstance(exc, (Upstream, grpc.aio.AioRpcError)):
        # A service behind us refused OUR credentials: the server's configuration is wrong, not the
        # caller's token, so the caller must not be told UNAUTHENTICATED.
        code, message = grpc.StatusCode.INTERNAL, internal_error(exc, what)
    return code, message


class ErrorMappingInterceptor(GuardInterceptor):
    """Domain exceptions -> gRPC status (serving.errors.status_for). An unexpected exception becomes
    INTERNAL with `internal_error`'s generic message and correlation id; the others are logged in one line."""

    @asynccontextmanager
    async def guard(self, method: str, context: grpc.aio.ServicerContext):
        try:
            yield
        except grpc.aio.AbortError:  # the handler chose its status itself
            raise
        except Exception as exc:  # noqa: BLE001 - mapped in one place
            code, message = client_status(exc, method)
            if code == grpc.StatusCode.INTERNAL:
                if not message.startswith(INTERNAL_MESSAGE):  # else logged by internal_error
                    log.error("%s: INTERNAL: %s", method, message)
            else:
                log.info("%s: %s: %s", method, code.name, message)
            await context.abort(code, message)


class OutcomeInterceptor(GuardInterceptor):
    """A guard that notes a call when it starts (`begin`) and hands its final status code to `end`."""

    def begin(self, method: str, context: grpc.aio.ServicerContext) -> Any:
        """State for `end`, or None to leave this call alone."""
        raise NotImplementedError

    def end(self, state: Any, code: str) -> None:
        raise NotImplementedError

    @asynccontextmanager
    async def guard(self, method: str, context: grpc.aio.ServicerContext):
        state = self.begin(method, context)
        if state is None:
            yield
            return
        code = "OK"
        try:
            yield
            code = _final_code(context)
        except BaseException as exc:
            code = _final_code(context, exc)
            raise
        finally:
            self.end(state, code)


class MetricsInterceptor(OutcomeInterceptor):
    """Per-RPC count by method and final status code, latency, and calls in flight."""

    def begin(self, method: str, context: grpc.aio.ServicerContext) -> tuple[str, float]:
        name = short_method(method)
        metrics.IN_FLIGHT.labels(method=name).inc()
        return name, time.perf_counter()

    def end(self, state: tuple[str, float], code: str) -> None:
        name, started = state
        metrics.IN_FLIGHT.labels(method=name).dec()
        metrics.RPCS.labels(method=name, code=code).inc()
        metrics.LATENCY.labels(method=name).observe(time.perf_counter() - started)


def _final_code(context: grpc.aio.ServicerContext, exc: BaseException | None = None) -> str:
    """The status name a call ended with: the context's code, or CANCELLED when the client left."""
    if exc is None:
        return _code_name(context, default="OK")
    return "CANCELLED" if _is_cancellation(exc) else _code_name(context, default="UNKNOWN")


def _code_name(context: grpc.aio.ServicerContext, default: str) -> str:
    code = context.code()
    if code is None:
        return default
    if isinstance(code, grpc.StatusCode):
        return code.name
    # Some grpc versions hand back the integer value of the status.
    return next((c.name for c in grpc.StatusCode if c.value[0] == code), default)


class RequestLogInterceptor(OutcomeInterceptor):
    """One structured line per RPC (serving.request_log): request id from the `x-request-id` metadata,
    trace id, timings the servicer noted, final status. Health and reflection calls are not requests."""

    def begin(self, method: str, context: grpc.aio.ServicerContext):
        if method.startswith("/grpc."):
            return None
        sent = dict(context.invocation_metadata() or ()).get(request_log.REQUEST_ID_HEADER, "")
        record = request_log.start(short_method(method), sent)
        tracing.tag_current_span(record.request_id)
        return record

    def end(self, record, code: str) -> None:
        request_log.finish(record, code)

def standard_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """What every server runs first, outermost first."""
    return [RequestLogInterceptor(), MetricsInterceptor(), ErrorMappingInterceptor()]

