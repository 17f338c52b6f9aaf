"""OpenTelemetry tracing for the three services: set-up, and the few span helpers their code uses.

Off by default. `setup` (each service's __main__, from `TelemetryOptions`) installs an SDK tracer provider
with an OTLP/gRPC exporter; from then on `GrpcServer` puts the OpenTelemetry gRPC server interceptor in
front of every server and `serving.channels` the client interceptors on every channel, so W3C trace
context travels in gRPC metadata and the spans of one image in three processes form one trace. When it is
off nothing of OpenTelemetry is imported and every helper here returns at its first line.

Spans carry the request id (`i2s.request_id`, from the request log record) and counts or sizes, never an
image, a prompt or a caption. Work done for several requests at once (an audio batch) is one span per
request, each under its own request's span. Spans are started with an explicit parent and never made
current, except `current_span` (a coroutine's own task), so they are safe across threads and in generators.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from serving import request_context
from serving.config import setting
from serving.errors import status_for

TRACER_NAME = "image_to_sound"
REQUEST_ID = "i2s.request_id"
STATUS_CODE = "i2s.status_code"  # the gRPC code of a failed image or clip, on its span
STATUS_CHARS = 200
_NOT_TRACED = ("grpc.health.v1.", "grpc.reflection.")  # probes and mirrors: noise, not requests

_tracer: Any = None  # the SDK tracer once `setup` turned tracing on
_provider: Any = None


@dataclass(frozen=True)
class TelemetryOptions:
    """Tracing and log format (flags and I2S_<SERVICE>_* variables derived by serving.config)."""

    tracing: bool = setting(False, "export OpenTelemetry traces over OTLP/gRPC (W3C trace context between services)")
    otlp_endpoint: str = setting("http://127.0.0.1:4317", "OTLP/gRPC collector for --tracing (https:// for TLS)")
    log_format: str = setting("text", "log lines as text or one JSON object per line", choices=["text", "json"])


def enabled() -> bool:
    return _tracer is not None


def setup(service: str, options: TelemetryOptions) -> None:
    """Turns tracing on for this process when the options ask. Spans are batched and sent in the
    background; the provider flushes them at exit."""
    global _tracer, _provider
    if not options.tracing or _tracer is not None:
        return
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    _provider = TracerProvider(resource=Resource.create({"service.name": f"i2s-{service}"}))
    _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=options.otlp_endpoint)))
    trace.set_tracer_provider(_provider)
    _tracer = _provider.get_tracer(TRACER_NAME)


def shutdown() -> None:
    """Export the spans still buffered and stop the exporter (a process about to leave without atexit)."""
    if _provider is not None:
        _provider.shutdown()


def _traced(method: str) -> bool:
    return not method.lstrip("/").startswith(_NOT_TRACED)


def server_interceptors() -> list:
    """The OpenTelemetry aio server interceptor (outermost: the request log sees its trace id), or none."""
    if _tracer is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor(tracer_provider=_provider,
                                   filter_=lambda details: _traced(details.method))]


def client_interceptors() -> list:
    """The OpenTelemetry aio client interceptors (inject W3C trace context into call metadata), or none."""
    if _tracer is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    def traced(details) -> bool:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        return _traced(method)

    def tag(span, _request) -> None:  # the client span of a model call: the caller's request id
        span.set_attribute(REQUEST_ID, request_context.request_id())

    return aio_client_interceptors(tracer_provider=_provider, filter_=traced, request_hook=tag)


# --- the request's context -----------------------------------------------------------------------

@dataclass(frozen=True)
class Parent:
    """Where a request's spans go: its trace context and request id, captured on the request's own task
    for work that runs elsewhere (a model thread, the batcher)."""

    context: Any
    request_id: str


def capture() -> Parent | None:
    """The current request's context, or None when tracing is off or no span is current (a warm-up is no
    request: its work would start traces of its own)."""
    if _tracer is None:
        return None
    from opentelemetry import context, trace

    if not trace.get_current_span().get_span_context().is_valid:
        return None
    return Parent(context.get_current(), request_context.request_id())


def tag_current_span(request_id: str) -> None:
    """Puts the request id on the current span (an RPC's server span, once the id is known)."""
    if _tracer is not None and request_id:
        from opentelemetry import trace

        trace.get_current_span().set_attribute(REQUEST_ID, request_id)


def current_trace_id() -> str:
    """The current span's trace id in hex ("" when tracing is off or no span is current)."""
    if _tracer is None:
        return ""
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def _start(parent: Parent, name: str, start_ns: int | None, attributes: dict) -> Any:
    return _tracer.start_span(name, context=parent.context, start_time=start_ns,
                              attributes={REQUEST_ID: parent.request_id, **attributes})


def record_span(parent: Parent | None, name: str, start_ns: int, end_ns: int | None = None, **attributes) -> None:
    """A finished span from `start_ns` (time.time_ns()) to `end_ns` (default now) under `parent`."""
    if parent is None:
        return
    _start(parent, name, start_ns, attributes).end(end_ns)


@contextlib.contextmanager
def span(name: str, **attributes) -> Iterator[None]:
    """A leaf span around a block, under the current request's span (not made current)."""
    parent = capture()
    if parent is None:
        yield
        return
    started = _start(parent, name, None, attributes)
    try:
        yield
    finally:
        started.end()


class SpanOutcome:
    """What `current_span` yields. An exception leaving the block marks the span as failed with the status
    the client is told; `fail` marks it for a failure that was handled (a clip reported as ClipFailed)."""

    def __init__(self, span: Any = None):
        self._span = span

    def fail(self, code: Any, message: str) -> None:
        """Status ERROR with "CODE: message" (the gRPC code and the client's message, bounded)."""
        if self._span is None:
            return
        from opentelemetry.trace import Status, StatusCode

        self._span.set_attribute(STATUS_CODE, code.name)
        self._span.set_status(Status(StatusCode.ERROR, f"{code.name}: {message}"[:STATUS_CHARS]))


@contextlib.contextmanager
def current_span(name: str, request_id: str = "", **attributes) -> Iterator[SpanOutcome]:
    """A span made current for the block (the calls it makes become its children). Only in a coroutine
    or thread of its own, never around a `yield` of a generator. Cancellation (the caller left) is no
    failure; the exception's traceback is not recorded (the log has it; a span carries no internals)."""
    if _tracer is None:
        yield SpanOutcome()
        return
    attributes = {REQUEST_ID: request_id or request_context.request_id(), **attributes}
    with _tracer.start_as_current_span(name, attributes=attributes, record_exception=False,
                                       set_status_on_exception=False) as span:
        outcome = SpanOutcome(span)
        try:
            yield outcome
        except Exception as exc:
            outcome.fail(*status_for(exc))
            raise


def now_ns() -> int:
    return time.time_ns()


# --- consecutive stages ---------------------------------------------------------------------------

class Phases:
    """Consecutive stages of work as spans: `enter(name)` ends the stage running and starts the next;
    `end()` ends the last. For a batch, each stage is one span under each parent (each request).
    Callable from any thread. With no parents (tracing off) every call returns at once."""

    def __init__(self, parents: list[Parent], **attributes):
        self.parents = parents
        self.attributes = attributes
        self._open: list[Any] = []
        self._lock = threading.Lock()  # a model thread enters stages; the request's end may close them

    def enter(self, name: str, **attributes) -> None:
        if not self.parents:
            return
        with self._lock:
            at = time.time_ns()
            self._end(at)
            self._open = [_start(p, name, at, {**self.attributes, **attributes}) for p in self.parents]

    def end(self) -> None:
        if self.parents:
            with self._lock:
                self._end(time.time_ns())

    def _end(self, at: int) -> None:
        for opened in self._open:
            opened.end(at)
        self._open = []


NO_PHASES = Phases([])


def request_phases(first: str, **attributes) -> Phases:
    """Phases of the current request, its first stage started now (e.g. a queue wait). The stage still
    running when the request's RPC ends (its log record closes) ends then."""
    parent = capture()
    if parent is None:
        return NO_PHASES
    phases = Phases([parent], **attributes)
    phases.enter(first)
    record = request_context.current()
    if record is not None:
        record.closers.append(phases.end)
    return phases


_batch_phases: contextvars.ContextVar[Phases] = contextvars.ContextVar("i2s_batch_phases", default=NO_PHASES)


def batch_phases() -> Phases:
    """The phases of the batch this code runs for (set by `run_with_phases`; NO_PHASES otherwise)."""
    return _batch_phases.get()


def run_with_phases(phases: Phases, fn: Callable[[], Any]) -> Callable[[], Any]:
    """`fn` as a callable that runs with `phases` as `batch_phases()` (in a copy of this context, so it may
    run on another thread; `serving.blocking.ModelWorker.run` carries it on to the model thread)."""
    if not phases.parents:
        return fn
    context = contextvars.copy_context()
    context.run(_batch_phases.set, phases)
    return lambda: context.run(fn)
