"""Domain errors and their one mapping to gRPC status codes (design.md §5).

Servicers raise (or let through) these exceptions; `grpc_errors` turns them into statuses. Anything
unexpected becomes INTERNAL with a generic message, the details go to the log.
"""
from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from typing import Any, AsyncIterator, Callable

import grpc

from serving import metrics

log = logging.getLogger(__name__)


class InvalidInput(ValueError):
    """The request is malformed or out of bounds (INVALID_ARGUMENT)."""


class NotReady(RuntimeError):
    """The model is not loaded or warmed yet (UNAVAILABLE)."""


class Overloaded(RuntimeError):
    """Queues are full; retry later (RESOURCE_EXHAUSTED)."""


class Upstream(RuntimeError):
    """A downstream gRPC call failed; carries its status code through unchanged."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and the client-facing message for an exception."""
    if isinstance(exc, InvalidInput):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc) or "invalid argument"
    if isinstance(exc, NotReady):
        return grpc.StatusCode.UNAVAILABLE, str(exc) or "not ready"
    if isinstance(exc, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc) or "overloaded, retry later"
    if isinstance(exc, Upstream):
        return exc.code, str(exc)
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code(), exc.details() or exc.code().name
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
    return grpc.StatusCode.INTERNAL, "internal error (see the server log)"


async def _abort(context: grpc.aio.ServicerContext, method: str, exc: BaseException) -> None:
    code, message = status_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("%s failed", method, exc_info=exc)
    else:
        log.info("%s: %s: %s", method, code.name, message)
    metrics.RPCS.labels(method=method, code=code.name).inc()
    await context.abort(code, message)


def grpc_errors(handler: Callable) -> Callable:
    """Wraps a unary or server-streaming grpc.aio handler: maps exceptions to statuses, records metrics."""
    method = handler.__name__

    if inspect.isasyncgenfunction(handler):

        @functools.wraps(handler)
        async def stream_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator:
            start = time.perf_counter()
            metrics.IN_FLIGHT.labels(method=method).inc()
            try:
                async for item in handler(self, request, context):
                    yield item
            except asyncio.CancelledError:
                metrics.RPCS.labels(method=method, code="CANCELLED").inc()
                raise
            except Exception as exc:  # noqa: BLE001 - mapped in one place
                await _abort(context, method, exc)
            else:
                metrics.RPCS.labels(method=method, code="OK").inc()
            finally:
                metrics.IN_FLIGHT.labels(method=method).dec()
                metrics.LATENCY.labels(method=method).observe(time.perf_counter() - start)

        return stream_wrapper

    @functools.wraps(handler)
    async def unary_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        start = time.perf_counter()
        metrics.IN_FLIGHT.labels(method=method).inc()
        try:
            response = await handler(self, request, context)
        except asyncio.CancelledError:
            metrics.RPCS.labels(method=method, code="CANCELLED").inc()
            raise
        except Exception as exc:  # noqa: BLE001 - mapped in one place
            await _abort(context, method, exc)
        else:
            metrics.RPCS.labels(method=method, code="OK").inc()
            return response
        finally:
            metrics.IN_FLIGHT.labels(method=method).dec()
            metrics.LATENCY.labels(method=method).observe(time.perf_counter() - start)

    return unary_wrapper
