"""The domain errors of all three services, and their one mapping to gRPC status codes (design.md §5).

Backends and servicers raise these; `serving.interceptors.ErrorMappingInterceptor` turns them into
statuses for every RPC of a server, and the orchestrator uses `status_for` for per-image and per-clip
failure events inside streams. Anything not listed becomes INTERNAL with a generic message; the details
go to the log only.
"""
from __future__ import annotations

import grpc


class ServiceError(Exception):
    """Base of the domain errors. `code` is the gRPC status a client sees; the message is safe to show."""

    code = grpc.StatusCode.INTERNAL
    default_message = "internal error"

    def __init__(self, message: str = ""):
        super().__init__(message or self.default_message)


class InvalidInput(ServiceError, ValueError):
    """The request is malformed or out of bounds."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_message = "invalid argument"


class NotReady(ServiceError):
    """The model is not loaded or warmed yet, or the service is shutting down."""

    code = grpc.StatusCode.UNAVAILABLE
    default_message = "not ready"


class Overloaded(ServiceError):
    """Queues are full; retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_message = "overloaded, retry later"


class Cancelled(ServiceError):
    """The work was stopped because its caller went away."""

    code = grpc.StatusCode.CANCELLED
    default_message = "cancelled"


class DeadlineExceeded(ServiceError, TimeoutError):
    """The caller's deadline passed before the work was done."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_message = "deadline exceeded"


class Upstream(ServiceError):
    """A downstream gRPC call failed; carries its status code through unchanged."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and the client-facing message for an exception."""
    if isinstance(exc, ServiceError):
        return exc.code, str(exc)
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code(), exc.details() or exc.code().name
    if isinstance(exc, TimeoutError):  # asyncio.wait_for and friends
        return grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded.default_message
    return grpc.StatusCode.INTERNAL, "internal error (see the server log)"
