"""The request a task is working for: the record its log line is built from (serving.request_log) and whose
id its spans carry (serving.tracing). Below both, so neither imports the other."""
from __future__ import annotations

import contextvars
import time
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class RequestRecord:
    method: str
    request_id: str = ""
    trace_id: str = ""
    started: float = field(default_factory=time.perf_counter)
    fields: dict[str, Any] = field(default_factory=dict)  # timings (seconds) and counts the service adds
    closers: list[Callable[[], None]] = field(default_factory=list)  # spans to end with the request

    def line(self, code: str) -> dict[str, Any]:
        return {"event": "request", "method": self.method, "request_id": self.request_id,
                "trace_id": self.trace_id, "status": code,
                "seconds": round(time.perf_counter() - self.started, 6), **self.fields}


_current: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar("i2s_request", default=None)


def current() -> RequestRecord | None:
    """The current task's request (None outside one: a warm-up, a background job)."""
    return _current.get()


def enter(record: RequestRecord) -> None:
    """Makes `record` the current task's request (each RPC and each image runs in a task of its own)."""
    _current.set(record)


def request_id() -> str:
    """The current request's id ("" outside a request)."""
    record = _current.get()
    return record.request_id if record is not None else ""
