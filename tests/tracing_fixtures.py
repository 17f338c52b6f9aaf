"""Tracing on in the test's own process, into memory: for tests of which spans the code makes."""
from __future__ import annotations

import pytest

__all__ = ["spans"]


@pytest.fixture
def spans(monkeypatch):
    """Tracing on in this process for one test, into memory (no global provider, nothing exported)."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from serving import tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "_provider", provider)
    monkeypatch.setattr(tracing, "_tracer", provider.get_tracer("test"))
    yield exporter
    provider.shutdown()
