"""Prometheus metrics shared by the services, served on a separate HTTP port (`--metrics-port`)."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RPCS = Counter("i2s_rpcs_total", "RPCs finished, by method and gRPC status code", ["method", "code"])
LATENCY = Histogram(
    "i2s_rpc_seconds",
    "Wall time of RPCs, by method (streams: until the last message)",
    ["method"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
)
IN_FLIGHT = Gauge("i2s_rpcs_in_flight", "RPCs being served now, by method", ["method"])
MODEL_SECONDS = Histogram(
    "i2s_model_seconds",
    "Time spent in model calls, by stage (vlm: one description; audio: one batch)",
    ["stage"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)
TIME_TO_FIRST_AUDIO = Histogram(
    "i2s_time_to_first_audio_seconds",
    "Orchestrator: from an image's arrival to its first audio chunk",
    buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300),
)
AUDIO_STOPPED_EARLY = Counter(
    "i2s_audio_batches_stopped_early_total", "Audio batches whose callers all left, stopped before the last step"
)


def serve_metrics(port: int, host: str = "127.0.0.1") -> int:
    """Starts the /metrics endpoint on `host` (the gRPC bind address) unless port is negative; returns the
    bound port (0 picks a free one)."""
    if port < 0:
        return -1
    server, _thread = start_http_server(port, addr=host)
    return server.server_port
