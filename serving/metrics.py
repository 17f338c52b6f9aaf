"""Prometheus metrics shared by the services, served on a separate HTTP port (`--metrics-port`)."""
from __future__ import annotations

import sys

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

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
AUDIO_STOPPED_EARLY = Counter(
    "i2s_audio_batches_stopped_early_total", "Audio batches whose callers all left, stopped before the last step"
)

TIME_TO_FIRST_AUDIO = Histogram(
    "i2s_time_to_first_audio_seconds",
    "Orchestrator: from an image's start to its first audio chunk",
    buckets=(0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300),
)
QUEUE_DEPTH = Gauge("i2s_queue_depth", "Requests waiting, by queue (orchestrator admission, VLM, audio batcher)",
                    ["queue"])
QUEUE_WAIT = Histogram("i2s_queue_wait_seconds", "From arrival to admission, by stage (orchestrator admission, "
                       "VLM scheduler, audio batcher) and priority (interactive, batch)", ["stage", "priority"],
                       buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300))
CACHE_LOOKUPS = Counter("i2s_cache_lookups_total", "Result cache lookups, by cache (vlm, audio) and result (hit, "
                        "miss, bypass, uncacheable: no seed; error: the shared store failed, counted besides the "
                        "miss)", ["cache", "result"])
CACHE_EVICTIONS = Counter("i2s_cache_evictions_total", "Results dropped from the in-memory cache to stay within "
                          "--cache-max-bytes, by cache", ["cache"])
CACHE_BYTES = Gauge("i2s_cache_bytes", "Bytes of results in the in-memory cache, by cache", ["cache"])
WORK_CANCELLED = Counter("i2s_work_cancelled_total", "Requests stopped before they finished because their "
                         "callers left (or their deadlines passed), by stage (vlm, audio) and state (queued: "
                         "dropped before the model saw it; running: stopped at the next step)", ["stage", "state"])
AUDIO_BATCH_SIZE = Histogram("i2s_audio_batch_size", "Requests per audio model call",
                             buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32))
VLM_TOKENS = Counter("i2s_vlm_tokens_total", "VLM tokens of finished descriptions, by kind (prompt, output)",
                     ["kind"])



class _FastPath:
    """i2s_fast_path{service, path}: 1 for the path that serves (serving.fast_path.report)."""

    def __init__(self) -> None:
        self.gauge = Gauge("i2s_fast_path", "The path that serves a model, after its self-check at start-up "
                           "(1; e.g. vlm cuda-graph, compile or eager; audio compiled or eager)", ["service", "path"])
        self._paths: dict[str, set[str]] = {}

    def labels(self, *, service: str, path: str):
        self._paths.setdefault(service, set()).add(path)
        return self.gauge.labels(service=service, path=path)

    def clear_service(self, service: str) -> None:
        for path in self._paths.pop(service, set()):
            self.gauge.remove(service, path)


FAST_PATH = _FastPath()
NONFINITE_AUDIO = Counter("i2s_audio_nonfinite_clips_total",
                          "Audio clips failed because the model produced NaN or infinite samples")

class GpuMemoryCollector:
    """i2s_gpu_memory_bytes{device, kind}: torch's allocated and reserved CUDA memory, read at scrape time.
    Only when the process already uses torch with CUDA (nothing is imported for it); else no samples."""

    def collect(self):
        family = GaugeMetricFamily("i2s_gpu_memory_bytes", "CUDA memory held by this process's torch, by device "
                                   "and kind (allocated: tensors; reserved: the caching allocator's pool)",
                                   labels=["device", "kind"])
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            for index in range(torch.cuda.device_count()):
                device = f"cuda:{index}"
                family.add_metric([device, "allocated"], float(torch.cuda.memory_allocated(index)))
                family.add_metric([device, "reserved"], float(torch.cuda.memory_reserved(index)))
        yield family


GPU_MEMORY = GpuMemoryCollector()
REGISTRY.register(GPU_MEMORY)


def serve_metrics(port: int, host: str = "127.0.0.1") -> int:
    """Starts the /metrics endpoint on `host` (the gRPC bind address) unless port is negative; returns the
    bound port (0 picks a free one)."""
    if port < 0:
        return -1
    server, _thread = start_http_server(port, addr=host)
    return server.server_port
