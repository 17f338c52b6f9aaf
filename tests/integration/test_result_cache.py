"""The result cache in the model services, with the tiny real checkpoints: a hit streams the bytes the first
render sent, says so, and calls no model (counted); seedless requests, a bypass and another model revision
never hit; with a real Redis that is killed mid-run, requests still succeed and the log says why."""
from __future__ import annotations

import asyncio
import contextlib
import io
import logging

import grpc
import pytest
import pytest_asyncio
from PIL import Image

from audio_service.config import AudioConfig
from audio_service.server import make_server as make_audio_server
from image_to_sound.v1 import audio_pb2, audio_pb2_grpc, common_pb2, vision_pb2, vision_pb2_grpc
from serving.result_cache import CacheOptions
from serving.server import ServerOptions
from tests.redis_server import redis_server
from vlm_service.config import VlmConfig
from vlm_service.server import load_and_warm as warm_vlm, make_server as make_vlm_server
from vlm_service.transformers_backend import TransformersVisionBackend

WAIT = 120
PROMPT = "Rain drumming on a tin roof"


def audio_request(seed: int | None = 5, **fields) -> audio_pb2.GenerateAudioRequest:
    settings = common_pb2.AudioSettings(duration_seconds=1.0, num_inference_steps=2)
    if seed is not None:
        settings.seed = seed
    return audio_pb2.GenerateAudioRequest(prompt=PROMPT, settings=settings, **{"clip_id": "c", **fields})


async def clip(stub, request) -> tuple[bytes, common_pb2.ClipMetadata]:
    chunks = [r.chunk async for r in stub.GenerateAudio(request, timeout=WAIT) if r.WhichOneof("event") == "chunk"]
    return b"".join(c.data for c in chunks), chunks[-1].metadata


@contextlib.asynccontextmanager
async def stub_on(server, stub_class):
    """A stub on a channel to `server` (started; SERVING from here on); the channel and the server end after."""
    await server.set_serving(True)
    channel = grpc.aio.insecure_channel(server.address)
    try:
        yield stub_class(channel)
    finally:
        await channel.close()
        await server.stop()


@contextlib.asynccontextmanager
async def audio_server(backend, cache: CacheOptions = CacheOptions()):
    """(stub, servicer) of an audio service on `backend`, its result cache as `cache` says."""
    config = AudioConfig(model="tiny", max_wait_ms=0, cache=cache, server=ServerOptions(port=0, grace_seconds=1))
    server, servicer = make_audio_server(config, backend)
    await server.start()
    try:
        async with stub_on(server, audio_pb2_grpc.AudioServiceStub) as stub:
            yield stub, servicer
    finally:
        await servicer.close()


@pytest_asyncio.fixture
async def audio_service(tiny_audio_backend):
    """An audio service on the session's tiny AudioLDM2, caching in its own memory."""
    async with audio_server(tiny_audio_backend) as service:
        yield service


async def test_an_audio_hit_streams_the_same_bytes_says_so_and_runs_no_model(audio_service):
    stub, servicer = audio_service
    first, first_meta = await clip(stub, audio_request(seed=5))
    calls = servicer.batcher.backend_calls
    again, again_meta = await clip(stub, audio_request(seed=5))
    assert servicer.batcher.backend_calls == calls  # no model call for the second
    assert again == first and not first_meta.cache_hit and again_meta.cache_hit
    first_meta.cache_hit = True
    assert again_meta == first_meta  # everything else as the render reported it (seed, steps, score, ...)
    # The clip id is the call's own; a different encoding of the same clip is still a hit.
    wav = [r.chunk async for r in stub.GenerateAudio(audio_request(seed=5, clip_id="other"), timeout=WAIT)]
    assert servicer.batcher.backend_calls == calls and {c.clip_id for c in wav} == {"other"}


async def test_the_audio_service_says_what_it_makes(audio_service):
    """GetAudioLimits, which the orchestrator checks requests against: the diffusers backend makes windows
    (so the setting's 300 s) and scores clips (so it has the speech/music guard)."""
    stub, _ = audio_service
    assert await stub.GetAudioLimits(audio_pb2.GetAudioLimitsRequest(), timeout=WAIT) == audio_pb2.AudioLimits(
        max_clip_seconds=300.0, speech_music_guard=True)


@pytest.mark.parametrize("rate", [0, 48000], ids=["streamed-as-made", "sent-whole-at-48k"])
async def test_a_looped_clip_is_cached_and_a_hit_streams_the_same_chunks(audio_service, rate):
    """A looped clip goes through the clip maker (chunks as its samples are final, or whole at another rate);
    a hit is chunked the same way: the same chunks, the same loop points, no model call."""
    stub, servicer = audio_service
    request = audio_request(seed=9)
    request.settings.loop, request.settings.duration_seconds = True, 2.0  # a loop's shortest
    request.settings.sample_rate_hertz = rate

    async def chunks() -> list[common_pb2.AudioChunk]:
        return [r.chunk async for r in stub.GenerateAudio(request, timeout=WAIT) if r.WhichOneof("event") == "chunk"]

    first = await chunks()
    calls = servicer.batcher.backend_calls
    again = await chunks()
    assert servicer.batcher.backend_calls == calls  # no model call for the second
    assert len(first) > 1 and [(c.sequence_number, c.data, c.last) for c in again] == [
        (c.sequence_number, c.data, c.last) for c in first]
    first_meta, again_meta = first[-1].metadata, again[-1].metadata
    assert again_meta.cache_hit and not first_meta.cache_hit and first_meta.loop_end_sample > 0
    first_meta.cache_hit = True
    assert again_meta == first_meta  # loop points, loudness, seed: as the render reported them


async def test_seedless_bypassed_and_other_revision_requests_run_the_model(audio_service, tiny_audio_backend):
    stub, servicer = audio_service
    await clip(stub, audio_request(seed=6))
    calls = servicer.batcher.backend_calls
    await clip(stub, audio_request(seed=None))
    await clip(stub, audio_request(seed=None))  # a seedless request asks for a new sample each time
    assert servicer.batcher.backend_calls == calls + 2
    _, bypassed = await clip(stub, audio_request(seed=6, bypass_cache=True))
    assert servicer.batcher.backend_calls == calls + 3 and not bypassed.cache_hit
    revision = tiny_audio_backend.model_revision
    assert revision and revision.startswith("local-")  # the folder's fingerprint
    tiny_audio_backend.model_revision = "another-revision"
    try:
        _, other = await clip(stub, audio_request(seed=6))
    finally:
        tiny_audio_backend.model_revision = revision
    assert servicer.batcher.backend_calls == calls + 4 and not other.cache_hit


@pytest.fixture
def redis(tmp_path):
    with redis_server(tmp_path) as server:
        yield server


async def test_redis_killed_mid_run_requests_still_succeed_and_the_log_says_so(tiny_audio_backend, redis, caplog):
    options = CacheOptions(cache_url=redis.url, cache_retry_seconds=3600)  # no retry within the test
    async with audio_server(tiny_audio_backend, options) as (stub, servicer):
        first, _ = await clip(stub, audio_request(seed=21))
        stored, stored_meta = await clip(stub, audio_request(seed=21))
        assert stored == first and stored_meta.cache_hit  # served from Redis
        calls = servicer.batcher.backend_calls
        redis.kill()
        with caplog.at_level(logging.WARNING, logger="serving.result_cache"):
            after, after_meta = await clip(stub, audio_request(seed=21))
            again, _ = await clip(stub, audio_request(seed=22))
        assert not after_meta.cache_hit and len(after) == len(first) and again  # rendered, not failed
        assert servicer.batcher.backend_calls == calls + 2
        warnings = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
        assert len(warnings) == 1 and redis.url in warnings[0] and "serving without it" in warnings[0]


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (40, 90, 160)).save(buf, format="PNG")
    return buf.getvalue()


@pytest_asyncio.fixture(scope="module")
async def vlm_service(tiny_vlm_dir):
    config = VlmConfig(model=str(tiny_vlm_dir), server=ServerOptions(port=0, grace_seconds=1))
    backend = TransformersVisionBackend(str(tiny_vlm_dir), device="cpu", max_pixels=128 * 28 * 28)
    server, servicer = make_vlm_server(config, backend)
    await server.start()
    await asyncio.to_thread(warm_vlm, backend)
    try:
        async with stub_on(server, vision_pb2_grpc.VisionServiceStub) as stub:
            yield stub, backend
    finally:
        servicer.close()
        backend.close()


class CountingSubmits:
    """Counts the requests the backend hands its scheduler (each one a model run)."""

    def __init__(self, backend):
        self.backend, self.count, self.original = backend, 0, backend.submit

    def __enter__(self):
        def submit(*args, **kwargs):
            self.count += 1
            return self.original(*args, **kwargs)

        self.backend.submit = submit
        return self

    def __exit__(self, *exc):
        del self.backend.submit


async def test_a_description_hit_replays_the_stream_says_so_and_runs_no_model(vlm_service):
    stub, backend = vlm_service
    request = vision_pb2.StreamSceneDescriptionRequest(
        image=common_pb2.Image(data=png(), mime_type="image/png"),
        decoding=common_pb2.DecodingSettings(seed=3, temperature=0.7, max_new_tokens=1024))
    with CountingSubmits(backend) as model_runs:
        first = [r async for r in stub.StreamSceneDescription(request, timeout=WAIT)]
        again = [r async for r in stub.StreamSceneDescription(request, timeout=WAIT)]
        described = await stub.DescribeScene(vision_pb2.DescribeSceneRequest(image=request.image,
                                                                              decoding=request.decoding), timeout=WAIT)
        assert model_runs.count == 1  # the second stream and the unary call ran no model
        assert not first[-1].final.stats.cache_hit and again[-1].final.stats.cache_hit
        assert described.stats.cache_hit and described.description == first[-1].final.description
        again[-1].final.stats.cache_hit = False
        assert again == first  # the same events, in the same order

        seedless = vision_pb2.StreamSceneDescriptionRequest(image=request.image, decoding=common_pb2.DecodingSettings(
            temperature=0.7, max_new_tokens=1024))
        for _ in range(2):
            [r async for r in stub.StreamSceneDescription(seedless, timeout=WAIT)]
        bypass = vision_pb2.StreamSceneDescriptionRequest(image=request.image, decoding=request.decoding,
                                                          bypass_cache=True)
        bypassed = [r async for r in stub.StreamSceneDescription(bypass, timeout=WAIT)]
        assert model_runs.count == 4 and not bypassed[-1].final.stats.cache_hit
