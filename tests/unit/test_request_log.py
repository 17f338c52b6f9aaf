"""The per-request log line, the JSON log format, tracing being off by default, and the dashboard's metrics
being defined by the services (the e2e test checks they are served after traffic)."""
from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY

from serving import request_log, tracing
from serving.errors import InvalidInput
from serving.server import GrpcServer, ServerOptions

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def json_lines():
    """The request logger's records, formatted as --log-format json formats them."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(request_log.JsonFormatter("test"))
    logger = logging.getLogger("i2s.requests")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    yield lambda: [json.loads(line) for line in out.getvalue().splitlines()]
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def _server() -> GrpcServer:
    async def ok(request: bytes, context) -> bytes:
        request_log.note(tokens=7, model_seconds=0.25)
        return b"ok"

    async def refused(request: bytes, context) -> bytes:
        raise InvalidInput("no image")

    handler = grpc.method_handlers_generic_handler("test.Log", {
        "Ok": grpc.unary_unary_rpc_method_handler(ok),
        "Refused": grpc.unary_unary_rpc_method_handler(refused),
    })
    return GrpcServer(ServerOptions(port=0, grace_seconds=0.1), lambda s: s.add_generic_rpc_handlers((handler,)), [])


async def test_one_line_per_rpc_with_request_id_timings_and_final_status(json_lines):
    server = _server()
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            assert await channel.unary_unary("/test.Log/Ok")(b"", metadata=(("x-request-id", "img-1" + "x" * 500),)) == b"ok"
            with pytest.raises(grpc.aio.AioRpcError):
                await channel.unary_unary("/test.Log/Refused")(b"")
            # Health checks are not requests: no line.
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    finally:
        await server.stop()
    lines = json_lines()
    assert [(l["method"], l["status"]) for l in lines] == [("Ok", "OK"), ("Refused", "INVALID_ARGUMENT")]
    ok, refused = lines
    assert ok["request_id"] == ("img-1" + "x" * 500)[:128]  # a client's id is bounded in the log
    assert ok["tokens"] == 7 and ok["model_seconds"] == 0.25 and ok["seconds"] > 0
    assert ok["service"] == "test" and ok["event"] == "request"
    assert ok["trace_id"] == "" and refused["request_id"] == ""  # tracing off; no id sent


def test_an_image_record_says_the_status_its_error_maps_to(json_lines):
    with pytest.raises(InvalidInput):
        with request_log.record("StreamImagesToSound.image", "img-2"):
            request_log.note(time_to_first_audio_s=1.5)
            raise InvalidInput("bad")
    with request_log.record("StreamImagesToSound.image", "img-3"):
        pass
    assert [(l["request_id"], l["status"]) for l in json_lines()] == [("img-2", "INVALID_ARGUMENT"), ("img-3", "OK")]
    assert json_lines()[0]["time_to_first_audio_s"] == 1.5


def test_tracing_is_off_by_default_and_imports_nothing_of_opentelemetry():
    """The services, built with default settings, serve without tracing: no OpenTelemetry module is even
    imported, and every tracing helper is a no-op."""
    code = (
        "import sys, asyncio\n"
        "import orchestrator.server, vlm_service.server, audio_service.server, audio_service.batching\n"
        "from serving import tracing, channels\n"
        "from serving.server import GrpcServer, ServerOptions\n"
        "from orchestrator.config import parse_args\n"
        "config = parse_args([])\n"
        "tracing.setup('orchestrator', config.server.telemetry)\n"
        "assert not tracing.enabled() and tracing.capture() is None and tracing.request_phases('x') is tracing.NO_PHASES\n"
        "async def main():\n"
        "    GrpcServer(ServerOptions(port=0), lambda s: None, [])\n"
        "    await channels.aio_channel('127.0.0.1:1').close()\n"
        "asyncio.run(main())\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('opentelemetry'))\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_tracing_settings_are_flags_and_variables_of_every_service():
    from audio_service.config import AudioConfig
    from serving.config import parse_config
    from vlm_service.config import parse_args as vlm_args

    vlm = vlm_args(["--tracing", "--otlp-endpoint", "http://collector:4317", "--log-format", "json"])
    assert vlm.server.telemetry == tracing.TelemetryOptions(True, "http://collector:4317", "json")
    assert not vlm_args([]).server.telemetry.tracing
    audio = parse_config(AudioConfig, [], prefix="AUDIO", prog="t", description="t",
                         environ={"I2S_AUDIO_TRACING": "true", "I2S_AUDIO_LOG_FORMAT": "json"})
    assert audio.server.telemetry.tracing and audio.server.telemetry.log_format == "json"


def test_every_dashboard_metric_is_one_the_services_define():
    import serving.metrics  # noqa: F401 - registers the i2s_* metrics

    dashboard = json.loads((ROOT / "deploy" / "grafana" / "i2s-services.json").read_text())
    names = {n for p in dashboard["panels"] for t in p["targets"] for n in re.findall(r"\bi2s_[a-z0-9_]+\b", t["expr"])}
    defined = set()
    for metric in REGISTRY.collect():
        defined.add(metric.name)
        defined.update(sample.name for sample in metric.samples)
        if metric.type == "histogram":
            defined.update(f"{metric.name}_{suffix}" for suffix in ("bucket", "sum", "count"))
        if metric.type == "counter":
            defined.add(f"{metric.name}_total")
    assert names and names <= defined, names - defined
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


async def test_a_stream_logs_each_image_and_the_model_calls_name_its_request(json_lines):
    """The orchestrator (real, over fake model services) writes a line per image of a stream with its
    status and timings, and sends the image's request id to the model services, whose lines name it."""
    from image_to_sound.v1 import common_pb2, orchestrator_pb2 as pb, orchestrator_pb2_grpc
    from tests.fake_services import fake_stack, scripted_description

    config = pb.StreamConfig(audio=common_pb2.AudioSettings(duration_seconds=1, num_inference_steps=2, seed=1))
    messages = [pb.StreamImagesToSoundRequest(config=config)]
    for request_id in ("a", "b"):
        image = pb.ImageToSoundRequest(request_id=request_id, description=scripted_description(sources=1, variants=2))
        messages.append(pb.StreamImagesToSoundRequest(image=image))
    messages.append(pb.StreamImagesToSoundRequest(image=pb.ImageToSoundRequest(request_id="c")))  # no input
    async with fake_stack() as (target, _vision, _audio):
        async with grpc.aio.insecure_channel(target) as channel:
            events = [e async for e in orchestrator_pb2_grpc.OrchestratorStub(channel).StreamImagesToSound(
                iter(messages), timeout=60)]
    assert sum(e.WhichOneof("event") == "clip_done" for e in events) == 4
    lines = json_lines()
    images = {l["request_id"]: l for l in lines if l["method"] == "StreamImagesToSound.image"}
    assert {k: v["status"] for k, v in images.items()} == {"a": "OK", "b": "OK", "c": "INVALID_ARGUMENT"}
    assert images["a"]["clips_done"] == 2 and images["a"]["time_to_first_audio_s"] > 0
    audio = [l for l in lines if l["method"] == "GenerateAudio"]
    assert sorted(l["request_id"] for l in audio) == ["a", "a", "b", "b"]
    assert [l["status"] for l in lines if l["method"] == "StreamImagesToSound"] == ["OK"]
