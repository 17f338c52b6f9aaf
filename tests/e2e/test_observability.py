"""Tracing, request logs and the dashboard, on the three real service processes (tiny checkpoints, loopback).

The services run with --tracing and export over OTLP/gRPC to a collector this test starts (the collector
service of opentelemetry-proto, recording what it receives). One ImageToSound call must come back as one
trace whose spans, from the three processes, form one tree with every latency stage in it; each process's
JSON request line must name the same request and trace. Every metric a dashboard query uses must be in
the services' /metrics after that traffic.
"""
from __future__ import annotations

import json
import re
import threading
import urllib.request
from collections import Counter
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from image_to_sound.v1 import common_pb2, orchestrator_pb2 as pb, orchestrator_pb2_grpc
from i2s_client import make_request
from tests.real_stack import ServiceProcess, audio_process

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "i2s-services.json"
PHOTO = ROOT / "data" / "camera.png"
REQUEST_ID = "traced-1"
FAILED_ID = "traced-broken"  # an image the VLM cannot decode (its header passes the orchestrator's checks)
BOUND = 600
pytestmark = pytest.mark.e2e

# The stages of latency, by the process that measures them.
STAGES = {
    "i2s-orchestrator": {"orchestrator.admission_wait", "orchestrator.image", "orchestrator.clip"},
    "i2s-vlm": {"vlm.queue_wait", "vlm.prefill", "vlm.time_to_source", "vlm.decode"},
    "i2s-audio": {"audio.batch_wait", "audio.prompt_encoding", "audio.denoise", "audio.vae_vocoder",
                  "audio.clap_score", "audio.chunk_send"},
}


class Collector:
    """An OTLP/gRPC trace collector on loopback that keeps every span it is sent, with its service name."""

    def __init__(self):
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        self.spans: list[tuple[str, object]] = []
        self._lock = threading.Lock()
        collector = self

        class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                with collector._lock:
                    for resource_spans in request.resource_spans:
                        service = next(a.value.string_value for a in resource_spans.resource.attributes
                                       if a.key == "service.name")
                        for scope in resource_spans.scope_spans:
                            collector.spans.extend((service, span) for span in scope.spans)
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def stop(self) -> None:
        self.server.stop(0)


def metrics_port(process: ServiceProcess) -> int:
    """The /metrics port the service logged when it started listening (JSON log lines)."""
    for line in process.log_file.read_text().splitlines():
        if line.startswith("{") and "listening on" in line:
            return int(re.search(r"metrics port (\d+)", json.loads(line)["message"]).group(1))
    raise AssertionError(f"no listening line in the log:\n{process.log()}")


def request_lines(process: ServiceProcess) -> list[dict]:
    lines = [json.loads(line) for line in process.log_file.read_text().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == "request"]


@pytest.fixture(scope="module")
async def traced(tiny_vlm_dir, tiny_audio_dir):
    """The three services traced into one collector, after one ImageToSound call and one refused call;
    the processes are stopped (SIGTERM: they flush their spans on the way out) before the tests look."""
    collector = Collector()
    telemetry = ["--tracing", "--otlp-endpoint", f"http://127.0.0.1:{collector.port}", "--log-format", "json",
                 "--metrics-port", "0"]
    vlm = ServiceProcess("vlm_service", ["--model", str(tiny_vlm_dir), "--device", "cpu",
                                         "--max-pixels", str(64 * 28 * 28), *telemetry])
    audio = audio_process(tiny_audio_dir, 0, *telemetry)
    orchestrator = None
    try:
        import asyncio

        await asyncio.gather(vlm.serving(), audio.serving())
        orchestrator = ServiceProcess("orchestrator", ["--vlm", vlm.target, "--audio", audio.target, *telemetry])
        await orchestrator.serving()
        request = make_request(PHOTO, request_id=REQUEST_ID, duration_seconds=1, num_inference_steps=2, seed=1,
                               decoding=common_pb2.DecodingSettings(max_new_tokens=1024))
        async with grpc.aio.insecure_channel(orchestrator.target) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
            events = [e async for e in stub.ImageToSound(request, timeout=BOUND)]
            with pytest.raises(grpc.aio.AioRpcError) as refused:  # an error for the dashboard's error panel
                async for _ in stub.ImageToSound(pb.ImageToSoundRequest(request_id="bad"), timeout=60):
                    pass
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            broken = make_request(PHOTO, request_id=FAILED_ID)
            broken.image.data = broken.image.data[:2000]
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                async for _ in stub.ImageToSound(broken, timeout=60):
                    pass
            assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # A refused call's status is sent before the server's interceptors count it (they count on the way
            # out), so the scrape could run in between; a later call answered on the same event loop cannot.
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=60)
        scraped = {}
        for name, process in (("orchestrator", orchestrator), ("vlm", vlm), ("audio", audio)):
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port(process)}/metrics", timeout=30) as page:
                scraped[name] = page.read().decode()
        for process in (orchestrator, vlm, audio):
            assert await process.terminate() == 0, process.log()
        yield {"events": events, "collector": collector, "metrics": scraped, "failed": failed.value,
               "logs": {name: request_lines(p) for name, p in
                        (("i2s-orchestrator", orchestrator), ("i2s-vlm", vlm), ("i2s-audio", audio))}}
    finally:
        for process in (orchestrator, audio, vlm):
            if process is not None:
                process.close()
        collector.stop()


def attributes(span) -> dict:
    out = {}
    for a in span.attributes:
        value = a.value
        out[a.key] = getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else None
    return out


@pytest.mark.timeout(BOUND + 120)
def test_one_image_is_one_trace_across_the_three_processes(traced):
    events = traced["events"]
    clips = [e.clip_done for e in events if e.WhichOneof("event") == "clip_done"]
    assert clips, "the tiny VLM described no source: nothing reached the audio service"
    spans = traced["collector"].spans
    assert not [span.name for _, span in spans if "grpc.health" in span.name]  # probes and mirrors: not traced
    roots = [(s, sp) for s, sp in spans if sp.name == "/image_to_sound.v1.Orchestrator/ImageToSound"
             and attributes(sp).get("rpc.grpc.status_code") == 0]
    assert len(roots) == 1
    trace_id = roots[0][1].trace_id
    trace = [(service, span) for service, span in spans if span.trace_id == trace_id]
    by_id = {span.span_id: (service, span) for service, span in trace}
    assert len(by_id) == len(trace)

    # One tree: a single root (the orchestrator's server span: the test's client is not traced), every
    # other span's parent in the same trace.
    parentless = [span for _, span in trace if not span.parent_span_id]
    assert [span.span_id for span in parentless] == [roots[0][1].span_id]
    assert all(span.parent_span_id in by_id for _, span in trace if span.parent_span_id)
    assert {service for service, _ in trace} == set(STAGES)

    names = Counter((service, span.name) for service, span in trace)
    print(f"trace {trace_id.hex()}: {len(trace)} spans, {len(clips)} clips:",
          ", ".join(f"{service}:{name} x{n}" for (service, name), n in sorted(names.items())))
    for service, stages in STAGES.items():
        missing = {stage for stage in stages if not names[(service, stage)]}
        assert not missing, (service, missing, sorted(names))
    assert names[("i2s-orchestrator", "orchestrator.clip")] == len(clips)
    assert names[("i2s-audio", "audio.denoise")] == len(clips)  # one per clip, also when batched together
    assert names[("i2s-audio", "audio.clap_score")] == len(clips)
    assert all(span.status.code != span.status.STATUS_CODE_ERROR for _, span in trace)  # nothing failed

    def ancestors(span) -> list[str]:
        chain = []
        while span.parent_span_id:
            service, span = by_id[span.parent_span_id]
            chain.append(f"{service}:{span.name}")
        return chain

    # Each stage sits under its own service's server span, reached through the orchestrator's client span.
    for service, span in trace:
        if span.name.startswith("vlm."):
            assert ancestors(span)[:4] == [
                "i2s-vlm:/image_to_sound.v1.VisionService/StreamSceneDescription",
                "i2s-orchestrator:/image_to_sound.v1.VisionService/StreamSceneDescription",
                "i2s-orchestrator:orchestrator.image",
                "i2s-orchestrator:/image_to_sound.v1.Orchestrator/ImageToSound"], span.name
        if span.name.startswith("audio."):
            assert ancestors(span)[:4] == [
                "i2s-audio:/image_to_sound.v1.AudioService/GenerateAudio",
                "i2s-orchestrator:/image_to_sound.v1.AudioService/GenerateAudio",
                "i2s-orchestrator:orchestrator.clip",
                "i2s-orchestrator:orchestrator.image"], span.name
        # Every span, the gRPC ones included, names the request.
        assert attributes(span).get("i2s.request_id") == REQUEST_ID, (service, span.name)
        assert span.end_time_unix_nano >= span.start_time_unix_nano > 0

    # Nothing of the request's content: no prompt, no caption, no long text, no bytes.
    prompts = {c.prompt for c in clips}
    for _, span in trace:
        for key, value in attributes(span).items():
            assert not isinstance(value, bytes), key
            assert value not in prompts and (not isinstance(value, str) or len(value) < 200), key

    # One JSON request line per call in each process, naming the request and the trace.
    hex_trace = trace_id.hex()
    for service, lines in traced["logs"].items():
        mine = [line for line in lines if line["request_id"] == REQUEST_ID]
        expected = {"i2s-orchestrator": 1, "i2s-vlm": 1, "i2s-audio": len(clips)}[service]
        assert len(mine) == expected, (service, lines)
        for line in mine:
            assert line["trace_id"] == hex_trace and line["status"] == "OK" and line["seconds"] > 0
    orchestrator_line = next(l for l in traced["logs"]["i2s-orchestrator"] if l["request_id"] == REQUEST_ID)
    assert orchestrator_line["clips_done"] == len(clips) and orchestrator_line["time_to_first_audio_s"] > 0
    vlm_line = next(l for l in traced["logs"]["i2s-vlm"] if l["request_id"] == REQUEST_ID)
    assert vlm_line["output_tokens"] > 0 and vlm_line["time_to_first_token_s"] > 0
    refused = [l for l in traced["logs"]["i2s-orchestrator"] if l["request_id"] == "bad"]
    assert [l["status"] for l in refused] == ["INVALID_ARGUMENT"]


def test_a_failed_image_is_an_error_span_with_its_status(traced):
    """The image the VLM could not decode: its orchestrator.image span says so, with the status and
    message the caller got, as the request line does."""
    spans = traced["collector"].spans
    image = [span for service, span in spans if service == "i2s-orchestrator" and span.name == "orchestrator.image"
             and attributes(span).get("i2s.request_id") == FAILED_ID]
    assert len(image) == 1
    failed = traced["failed"]
    assert image[0].status.code == image[0].status.STATUS_CODE_ERROR
    assert image[0].status.message == f"INVALID_ARGUMENT: {failed.details()}"[:200]
    assert attributes(image[0])["i2s.status_code"] == "INVALID_ARGUMENT"
    line = [l for l in traced["logs"]["i2s-orchestrator"] if l["request_id"] == FAILED_ID]
    assert [l["status"] for l in line] == ["INVALID_ARGUMENT"]


def dashboard_metric_names() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert exprs
    return {name for expr in exprs for name in re.findall(r"\bi2s_[a-z0-9_]+\b", expr)}


def test_every_dashboard_metric_is_served_after_traffic(traced):
    scraped = "\n".join(traced["metrics"].values())
    samples = {line.split("{")[0].split(" ")[0] for line in scraped.splitlines() if line and not line.startswith("#")}
    types = set(re.findall(r"^# TYPE (\S+) ", scraped, flags=re.M))
    names = dashboard_metric_names()
    assert {"i2s_rpcs_total", "i2s_time_to_first_audio_seconds_bucket", "i2s_queue_depth",
            "i2s_audio_batch_size_bucket", "i2s_vlm_tokens_total", "i2s_gpu_memory_bytes"} <= names
    import torch

    # GPU memory has samples only where CUDA is in use; on this CPU machine the family is served empty.
    without_samples = set() if torch.cuda.is_available() else {"i2s_gpu_memory_bytes"}
    for name in names - without_samples:
        assert name in samples, name
    for name in without_samples:
        assert name in types, name
    # The error panel has something to show: the refused call and the image the VLM could not decode, by code.
    assert re.search(r'i2s_rpcs_total\{code="INVALID_ARGUMENT",method="ImageToSound"\} 2\.0', scraped)
