"""One structured log line per request: request id, trace id, timings, final status.

`serving.interceptors.RequestLogInterceptor` opens a `RequestRecord` for every RPC of every server (health
and reflection excepted) and writes its line when the call ends; the servicers add what they measured
(`note`). The orchestrator also writes one line per image of a stream (`record`). The request id comes
from the `x-request-id` call metadata (the orchestrator sends it downstream with every model call) or from
the orchestrator's request itself; the trace id from the current span when tracing is on.

`--log-format json` makes every log line of the process one JSON object (`configure_logging`); a request
line then holds its fields at the top level, ready for a log pipeline.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
import unicodedata
from typing import Any, Iterator

from serving import tracing
from serving.errors import status_for
from serving.request_context import RequestRecord, current, enter

REQUEST_ID_HEADER = "x-request-id"
MAX_ID_CHARS = 128
log = logging.getLogger("i2s.requests")


def clean_id(raw: str) -> str:
    """A client-sent id made safe to echo and log (the one cleaner of request ids): no control or format
    characters (no forged log lines), whitespace collapsed, at most MAX_ID_CHARS. May be empty."""
    kept = "".join(" " if c.isspace() else c for c in str(raw) if c.isspace() or unicodedata.category(c)[0] != "C")
    return " ".join(kept.split())[:MAX_ID_CHARS].rstrip()


def set_request_id(request_id: str) -> None:
    """The current request's id, once the service knows it (the orchestrator's request message)."""
    record = current()
    if record is not None:
        record.request_id = clean_id(request_id)
        tracing.tag_current_span(record.request_id)


def note(**fields: Any) -> None:
    """Adds timings or counts to the current request's line (nothing outside a request)."""
    record = current()
    if record is not None:
        record.fields.update({k: round(v, 6) if isinstance(v, float) else v for k, v in fields.items()})


def start(method: str, request_id: str = "") -> RequestRecord:
    """Opens the current task's record (each RPC and each image runs in a task of its own)."""
    record = RequestRecord(method=method, request_id=clean_id(request_id), trace_id=tracing.current_trace_id())
    enter(record)
    return record


def finish(record: RequestRecord, code: str) -> None:
    for close in record.closers:
        close()
    line = record.line(code)
    text = " ".join(f"{k}={v}" for k, v in line.items() if k != "event" and v != "")
    log.info("request %s", text, extra={"request": line})


@contextlib.contextmanager
def record(method: str, request_id: str) -> Iterator[RequestRecord]:
    """A record around one unit of work that is not an RPC of its own (an image of a stream): its line
    says OK, or the status its exception maps to."""
    entry = start(method, request_id)
    code = "OK"
    try:
        yield entry
    except BaseException as exc:
        code = "CANCELLED" if not isinstance(exc, Exception) else status_for(exc)[0].name
        raise
    finally:
        finish(entry, code)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, service, logger, message; a request line's fields on top."""

    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "service": self.service, "logger": record.name,
            "message": record.getMessage(),
        }
        request = getattr(record, "request", None)
        if request:
            entry.update(request)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


JsonFormatter.converter = time.gmtime


def configure_logging(service: str, log_format: str) -> None:
    """Switches the root logger's handlers to JSON lines when asked (text stays as basicConfig set it)."""
    if log_format != "json":
        return
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO)
    for handler in root.handlers:
        handler.setFormatter(JsonFormatter(service))
