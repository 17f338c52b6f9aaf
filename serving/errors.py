"""The domain errors of all three services, and their one mapping to gRPC status codes
(docs/architecture.md "The failure model").

Backends and servicers raise these; `serving.interceptors.ErrorMappingInterceptor` turns them into
statuses for every RPC of a server, and the orchestrator uses `status_for` for per-image and per-clip
failure events inside streams. Anything not listed becomes INTERNAL with a generic message; the details
go to the log only.
"""
from __future__ import annotations

import sys

import grpc

# How much of a client-provided string (mime type, name, id, prompt) an error message or log line repeats.
EXCERPT_CHARS = 64


def excerpt(value: object, limit: int = EXCERPT_CHARS) -> str:
    """A client string made safe to echo: control characters escaped (no forged log lines), cut to `limit`
    characters with the original length said, so a megabyte of input never becomes a megabyte of log."""
    text = value if isinstance(value, str) else repr(value)
    shown = repr(text[:limit])  # repr escapes control and format characters
    return shown if len(text) <= limit else f"{shown}... ({len(text)} characters)"


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


class MemoryExhausted(ServiceError):
    """The backend ran out of memory for this request (host or accelerator); others may still fit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_message = "out of memory for this request; retry later or ask for less"


class Upstream(ServiceError):
    """A downstream gRPC call failed; carries its status code through unchanged."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def is_out_of_memory(exc: BaseException) -> bool:
    """MemoryError, or an accelerator's out-of-memory error (torch.cuda.OutOfMemoryError, matched by name so
    that torch is never imported here)."""
    return isinstance(exc, (MemoryError, MemoryExhausted)) or any(
        cls.__name__ == "OutOfMemoryError" for cls in type(exc).__mro__)


def release_cached_memory() -> None:
    """Gives the accelerator's cached blocks back after an out-of-memory error (only if torch is in use)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and the client-facing message for an exception."""
    if is_out_of_memory(exc):
        release_cached_memory()  # the request that overflowed is gone; let the next one fit
        return MemoryExhausted.code, str(exc) if isinstance(exc, MemoryExhausted) else MemoryExhausted.default_message
    if isinstance(exc, ServiceError):
        return exc.code, str(exc)
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code(), exc.details() or exc.code().name
    if isinstance(exc, TimeoutError):  # asyncio.wait_for and friends
        return grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded.default_message
    return grpc.StatusCode.INTERNAL, "internal error (see the server log)"
