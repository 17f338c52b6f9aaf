"""The VLM service over gRPC with the tiny real Qwen2.5-VL checkpoint on a loopback port."""
import asyncio
import io
from pathlib import Path

import grpc
import jsonschema
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from image_to_sound.v1 import common_pb2, vision_pb2, vision_pb2_grpc
from serving.images import ImageLimits, mime_type_for
from serving.server import ServerOptions
from tests.vlm_fixtures import description_schema
from vlm_service.config import VlmConfig
from vlm_service.messages import Finished
from i2s_formats.source_merge import merge_sources
from vlm_service.rules import to_compact_dict
from vlm_service.server import load_and_warm, make_server
from vlm_service.transformers_backend import TransformersVisionBackend

ROOT = Path(__file__).resolve().parents[2]
PHOTOS = sorted(p for p in (ROOT / "data").rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp"})
FAST = common_pb2.DecodingSettings(max_new_tokens=1024)  # room for the tiny model to finish
SERVICER = []  # the servicer behind the `vlm` fixture, for the tests that call it in process


def png(size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (40, 90, 160)).save(buf, format="PNG")
    return buf.getvalue()


async def health(channel) -> int:
    response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="image_to_sound.v1.VisionService"))
    return response.status


@pytest_asyncio.fixture(scope="module")
async def vlm(tiny_vlm_dir):
    """(stub, channel) of a VLM service whose health was checked NOT_SERVING before loading."""
    config = VlmConfig(model=str(tiny_vlm_dir), image_limits=ImageLimits(max_pixels=4_000_000),
                       server=ServerOptions(port=0, grace_seconds=1))
    backend = TransformersVisionBackend(str(tiny_vlm_dir), device="cpu", max_pixels=128 * 28 * 28)
    server, servicer = make_server(config, backend)
    SERVICER[:] = [servicer]
    await server.start()
    channel = grpc.aio.insecure_channel(server.address)
    stub = vision_pb2_grpc.VisionServiceStub(channel)
    assert await health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.aio.AioRpcError) as info:  # before the model is loaded: UNAVAILABLE
        await stub.DescribeScene(vision_pb2.DescribeSceneRequest(image=common_pb2.Image(data=png())))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    await asyncio.to_thread(load_and_warm, backend)
    await server.set_serving(True)
    yield stub, channel
    await server.stop()
    await channel.close()
    servicer.close()
    backend.close()


async def test_health_is_serving_after_load_and_warm_up(vlm):
    _, channel = vlm
    assert await health(channel) == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("photo", PHOTOS, ids=[p.name for p in PHOTOS])
async def test_every_photo_gets_a_schema_valid_description(vlm, photo):
    stub, _ = vlm
    request = vision_pb2.DescribeSceneRequest(
        image=common_pb2.Image(data=photo.read_bytes(), mime_type=mime_type_for(photo.name)), decoding=FAST)
    response = await stub.DescribeScene(request, timeout=120)
    description = response.description
    jsonschema.validate(to_compact_dict(description), description_schema())
    assert description.scene and description.mood and description.sources
    assert description.prompt_version == "v1" and description.model_id
    ids = [v.id for s in description.sources for v in s.variants]
    assert len(ids) == len(set(ids))
    assert response.stats.prompt_tokens > 0 and response.stats.output_tokens > 0


async def test_stream_sends_scene_then_sources_before_the_final_and_they_add_up(vlm):
    stub, _ = vlm
    request = vision_pb2.StreamSceneDescriptionRequest(
        image=common_pb2.Image(data=(ROOT / "data" / "coffee.png").read_bytes()), decoding=FAST)
    events = [e async for e in stub.StreamSceneDescription(request, timeout=120)]
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "scene" and kinds[-1] == "final" and kinds.count("final") == 1
    assert "source" in kinds and kinds.index("source") < kinds.index("final")
    streamed = merge_sources(e.source for e in events if e.WhichOneof("event") == "source")
    final = events[-1].final.description
    assert [s.SerializeToString() for s in streamed] == [s.SerializeToString() for s in final.sources]
    assert (events[0].scene.scene, events[0].scene.mood) == (final.scene, final.mood)


async def test_same_seed_same_description(vlm):
    stub, _ = vlm
    decoding = common_pb2.DecodingSettings(max_new_tokens=200, temperature=0.8, top_p=0.9, seed=1234)
    request = vision_pb2.DescribeSceneRequest(image=common_pb2.Image(data=png()), decoding=decoding)
    first = await stub.DescribeScene(request, timeout=120)
    second = await stub.DescribeScene(request, timeout=120)
    assert first.description == second.description


def _truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((256, 256), 50).convert("RGB").save(buf, format="JPEG")
    return buf.getvalue()[:3000]


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="GIF")
    return buf.getvalue()


BAD_REQUESTS = {
    "empty bytes": (common_pb2.Image(data=b""), None, "empty"),
    "not an image": (common_pb2.Image(data=b"hello world" * 20), None, "not an image"),
    "truncated": (common_pb2.Image(data=_truncated_jpeg()), None, "truncated or corrupt"),
    "unsupported format": (common_pb2.Image(data=_gif()), None, "unsupported image format GIF"),
    "unsupported mime": (common_pb2.Image(data=png(), mime_type="image/tiff"), None, "unsupported mime_type"),
    "too many pixels": (common_pb2.Image(data=png((2500, 2000))), None, "pixels; the limit"),
    "absurd max_new_tokens": (None, common_pb2.DecodingSettings(max_new_tokens=1_000_000), "max_new_tokens"),
    "negative temperature": (None, common_pb2.DecodingSettings(temperature=-1), "temperature"),
    "NaN top_p": (None, common_pb2.DecodingSettings(temperature=0.5, top_p=float("nan")), "finite"),
    "zero top_p": (None, common_pb2.DecodingSettings(temperature=0.5, top_p=0.0), "top_p"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
async def test_bad_input_is_invalid_argument_and_the_service_keeps_serving(vlm, case):
    stub, channel = vlm
    image, decoding, message = BAD_REQUESTS[case]
    request = vision_pb2.DescribeSceneRequest(image=image or common_pb2.Image(data=png()), decoding=decoding)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.DescribeScene(request, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()
    assert await health(channel) == health_pb2.HealthCheckResponse.SERVING
    ok = await stub.DescribeScene(vision_pb2.DescribeSceneRequest(
        image=common_pb2.Image(data=png()), decoding=common_pb2.DecodingSettings(max_new_tokens=64)), timeout=120)
    assert ok.stats.output_tokens > 0


async def test_missing_image_is_invalid_argument(vlm):
    stub, _ = vlm
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.DescribeScene(vision_pb2.DescribeSceneRequest(), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "image is required" in info.value.details()


async def test_reflection_lists_the_services(vlm):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    _, channel = vlm
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def requests():
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for response in stub.ServerReflectionInfo(requests()):
        names = {s.name for s in response.list_services_response.service}
        break
    assert {"image_to_sound.v1.VisionService", "grpc.health.v1.Health"} <= names


# -- with the decode engine (the service's default) -------------------------------------------------------


@pytest_asyncio.fixture(scope="module")
async def vlm_engine(tiny_vlm_dir):
    """(stub, backend) of a VLM service whose backend decodes with the engine, built from the service flags."""
    from vlm_service.config import parse_args
    from vlm_service.server import build_backend

    config = parse_args(["--model", str(tiny_vlm_dir), "--device", "cpu", "--port", "0", "--max-queue", "2",
                         "--engine-max-batch", "4", "--engine-max-len", "2048", "--engine-jump-forward", "exact"])
    assert config.engine and config.engine_prefix_cache
    backend = build_backend(config)
    server, servicer = make_server(config, backend)
    SERVICER[:] = [servicer]
    await server.start()
    await asyncio.to_thread(load_and_warm, backend)
    await server.set_serving(True)
    channel = grpc.aio.insecure_channel(server.address)
    yield vision_pb2_grpc.VisionServiceStub(channel), backend
    await server.stop()
    await channel.close()
    servicer.close()
    backend.close()


async def test_concurrent_requests_are_decoded_together(vlm_engine):
    stub, backend = vlm_engine
    backend.engine.peak_rows = 0
    photos = [ROOT / "data" / "coffee.png", *PHOTOS[:2]]
    calls = [stub.DescribeScene(vision_pb2.DescribeSceneRequest(
        image=common_pb2.Image(data=p.read_bytes(), mime_type=mime_type_for(p.name)), decoding=FAST), timeout=300)
        for p in photos]
    responses = await asyncio.gather(*calls)
    assert backend.engine.peak_rows >= 2
    for call, response in zip(calls, responses):
        jsonschema.validate(to_compact_dict(response.description), description_schema())
        steps = int(dict(await call.trailing_metadata())["vlm-model-steps"])
        assert 0 < steps < response.stats.output_tokens  # jump-forward: forced tokens cost no step of their own


async def test_a_full_queue_is_resource_exhausted(vlm_engine):
    import threading

    from vlm_service.backend import DecodingOptions

    stub, backend = vlm_engine
    release = threading.Event()
    held = backend.worker.submit(release.wait)  # the model thread is busy: what is submitted now waits
    ended = [threading.Event() for _ in range(2)]
    image = Image.open(io.BytesIO(png()))
    for event in ended:  # fill the queue (--max-queue 2) directly
        backend.submit(image, DecodingOptions(max_new_tokens=8), lambda item, e=event: isinstance(item, Finished) and e.set())
    request = vision_pb2.DescribeSceneRequest(image=common_pb2.Image(data=png()),
                                              decoding=common_pb2.DecodingSettings(max_new_tokens=8))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.DescribeScene(request, timeout=60)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    release.set()
    await asyncio.wrap_future(held)
    for event in ended:
        assert await asyncio.to_thread(event.wait, 120)
    response = await stub.DescribeScene(request, timeout=120)  # and it serves again
    assert response.stats.output_tokens == 8


class DeadlineContext:
    """A call's context as the servicer reads it: only the time remaining matters here."""

    def __init__(self, remaining: float):
        self.remaining = remaining

    def time_remaining(self) -> float:
        return self.remaining

    def set_trailing_metadata(self, metadata) -> None:
        pass


async def test_a_description_cut_by_its_deadline_answers_deadline_exceeded(vlm):
    """The engine ends a row at its deadline (here one already passed: deterministic, no race with the
    call's own timer); the servicer turns that end into DEADLINE_EXCEEDED, never into a final description."""
    from serving.errors import DeadlineExceeded

    servicer = SERVICER[0]
    request = vision_pb2.StreamSceneDescriptionRequest(image=common_pb2.Image(data=png()), decoding=FAST)
    events = []
    with pytest.raises(DeadlineExceeded, match="deadline exceeded after 0 tokens"):
        async for event in servicer.StreamSceneDescription(request, DeadlineContext(0.0)):
            events.append(event.WhichOneof("event"))
    assert "final" not in events
    with pytest.raises(DeadlineExceeded):
        await servicer.DescribeScene(vision_pb2.DescribeSceneRequest(image=request.image, decoding=FAST),
                                     DeadlineContext(0.0))
    # with time to spare, the same request is a final description
    finals = [e async for e in servicer.StreamSceneDescription(request, DeadlineContext(600.0)) if e.HasField("final")]
    assert len(finals) == 1 and finals[0].final.description.sources
