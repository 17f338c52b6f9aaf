"""Orchestration logic on the real orchestrator with fake model services (tests/fake_services.py)."""
import asyncio

import grpc
import numpy as np
import pytest

from image_to_sound.v1 import common_pb2, orchestrator_pb2 as pb
from orchestrator import prompts
from i2s_client import AsyncImageToSoundClient, ImageResult, make_request
from tests.fake_services import FakeAudioServicer, FakeVisionServicer, fake_stack, scripted_description

BOUND = 60  # seconds: a generous bound so a broken pipeline fails instead of hanging


@pytest.fixture
def image_bytes():
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 120, 200)).save(buf, format="PNG")
    return buf.getvalue()


async def run_one(target, image, **kwargs) -> list[pb.ImageToSoundEvent]:
    async with AsyncImageToSoundClient(target) as client:
        return [e async for e in client.stream(image, **kwargs)]


async def test_one_image_streams_scene_sources_clips_description_summary(image_bytes):
    async with fake_stack() as (target, vision, audio):
        events = await asyncio.wait_for(run_one(target, image_bytes, request_id="img1", duration_seconds=1.5), BOUND)
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "scene" and kinds[-1] == "summary"
    assert all(e.request_id == "img1" for e in events)
    assert kinds.count("source") == 3 and kinds.count("description") == 1 and kinds.count("clip_done") == 6
    # Every clip says which caption rules made its prompt.
    assert {e.clip_done.prompt_style for e in events if e.HasField("clip_done")} == {prompts.PROMPT_STYLE_VERSION}
    result = ImageResult("img1")
    for e in events:
        result.add(e)
    assert sorted(c.file_name for c in result.clips) == sorted(
        f"{i:02d}_source_{s}_action_{v}.wav" for i, (s, v) in enumerate([(1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2)], 1))
    for clip in result.clips:
        assert clip.done and clip.waveform.shape == (24000,)
        assert clip.instrument_role == "drums" and clip.source_name.startswith("source")
        assert clip.prompt and clip.metadata.prompt == clip.prompt
    summary = events[-1].summary
    assert (summary.sources, summary.variants, summary.clips_done, summary.clips_failed) == (3, 6, 6, 0)
    assert 0 < summary.time_to_first_audio_seconds <= summary.total_seconds
    assert summary.vlm_stats.output_tokens == 20
    assert len(audio.prompts) == 6 and len(set(audio.prompts)) == 6


async def test_audio_starts_before_the_vlm_has_finished(image_bytes):
    """Pipelining observed: the fake VLM holds its stream after the first source until the test has
    received audio. Without pipelining no audio could arrive, and this would fail at the bound."""
    vision = FakeVisionServicer(hold_after_first_source=True)

    async def consume(target):
        first_audio_while_vlm_busy = None
        async with AsyncImageToSoundClient(target) as client:
            async for event in client.stream(image_bytes, duration_seconds=1):
                if event.WhichOneof("event") == "audio" and first_audio_while_vlm_busy is None:
                    first_audio_while_vlm_busy = not vision.finished
                    vision.release.set()
        return first_audio_while_vlm_busy

    async with fake_stack(vision=vision) as (target, _, _):
        assert await asyncio.wait_for(consume(target), BOUND) is True


async def test_summary_reports_pipelining(image_bytes):
    vision = FakeVisionServicer(hold_after_first_source=True)

    async def consume(target):
        async with AsyncImageToSoundClient(target) as client:
            async for event in client.stream(image_bytes, duration_seconds=1):
                if event.WhichOneof("event") == "clip_done":
                    vision.release.set()
                if event.WhichOneof("event") == "summary":
                    return event.summary

    async with fake_stack(vision=vision) as (target, _, _):
        summary = await asyncio.wait_for(consume(target), BOUND)
    # Source 1's two clips started (and finished) while the VLM held; sources 2 and 3 came after.
    assert summary.first_audio_while_describing
    assert summary.clips_started_while_describing >= 2


async def test_a_failed_clip_is_an_event_and_the_others_complete(image_bytes):
    audio = FakeAudioServicer(fail_word="source 2")
    async with fake_stack(audio=audio) as (target, _, _):
        events = await asyncio.wait_for(run_one(target, image_bytes, duration_seconds=1), BOUND)
    failed = [e.clip_failed for e in events if e.WhichOneof("event") == "clip_failed"]
    assert {f.clip.source_id for f in failed} == {"s2"} and len(failed) == 2
    assert all(f.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "scripted failure" in f.message for f in failed)
    summary = events[-1].summary
    assert (summary.clips_done, summary.clips_failed) == (4, 2)


async def test_bad_image_is_invalid_argument(image_bytes):
    async with fake_stack() as (target, _, audio):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(run_one(target, b"not an image at all"), BOUND)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not an image" in info.value.details()
        assert audio.prompts == []
        # ... and the service goes on serving.
        events = await asyncio.wait_for(run_one(target, image_bytes, duration_seconds=1), BOUND)
        assert events[-1].WhichOneof("event") == "summary"


async def test_description_input_skips_the_vlm_and_skip_audio_skips_audio(image_bytes):
    async with fake_stack() as (target, vision, audio):
        events = await asyncio.wait_for(run_one(target, None, description=scripted_description(2, 1), duration_seconds=1), BOUND)
        assert vision.calls == 0 and len(audio.prompts) == 2
        assert events[-1].summary.clips_done == 2
        events = await asyncio.wait_for(
            run_one(target, image_bytes, options=pb.PipelineOptions(skip_audio=True)), BOUND)
        assert vision.calls == 1 and len(audio.prompts) == 2
        assert not any(e.WhichOneof("event") in ("audio", "clip_done") for e in events)
        assert events[-1].summary.variants == 6 and events[-1].summary.clips_done == 0


async def test_bidirectional_stream_attributes_events_and_survives_a_corrupt_image(image_bytes):
    requests = [make_request(image_bytes, request_id=f"img{i}") for i in range(3)]
    requests.insert(1, make_request(b"\x89PNG\r\n\x1a\n broken", request_id="corrupt"))
    async with fake_stack() as (target, _, audio):
        async with AsyncImageToSoundClient(target) as client:
            config = pb.StreamConfig(audio=common_pb2.AudioSettings(duration_seconds=1))

            async def collect():
                return [e async for e in client.stream_many(requests, config=config)]

            events = await asyncio.wait_for(collect(), BOUND)
    by_id: dict[str, list] = {}
    for e in events:
        by_id.setdefault(e.request_id, []).append(e.WhichOneof("event"))
    assert set(by_id) == {"img0", "img1", "img2", "corrupt"}
    assert by_id["corrupt"] == ["image_failed"]
    for rid in ("img0", "img1", "img2"):
        assert by_id[rid][0] == "scene" and by_id[rid][-1] == "summary" and by_id[rid].count("clip_done") == 6
    # Events of different images interleave (they ran concurrently), and the config applied to all.
    order = [e.request_id for e in events if e.request_id != "corrupt"]
    assert order != sorted(order, key=lambda r: int(r[-1]))
    assert len(audio.prompts) == 18


async def test_audio_calls_are_bounded(image_bytes):
    async with fake_stack(max_audio_calls=2) as (target, _, audio):
        await asyncio.wait_for(run_one(target, image_bytes, duration_seconds=1), BOUND)
    assert audio.max_in_flight <= 2 and len(audio.prompts) == 6


async def test_client_cancellation_cancels_the_audio_calls(image_bytes):
    audio = FakeAudioServicer(gate=asyncio.Event())  # audio never finishes on its own
    async with fake_stack(audio=audio) as (target, _, _):
        async with AsyncImageToSoundClient(target) as client:

            async def consume():
                async for _event in client.stream(image_bytes, duration_seconds=1):
                    pass

            reader = asyncio.create_task(consume())
            await asyncio.wait_for(audio.entered.wait(), BOUND)
            reader.cancel()  # the client goes away mid-stream
            await asyncio.gather(reader, return_exceptions=True)
            await asyncio.wait_for(audio.was_cancelled.wait(), BOUND)
    assert audio.cancelled >= 1


async def test_the_deadline_is_passed_downstream(image_bytes):
    async with fake_stack() as (target, _, audio):
        await asyncio.wait_for(run_one(target, image_bytes, duration_seconds=1, timeout=30), BOUND)
    # The caller's 30 s, not the orchestrator's 600 s default (gRPC rounds deadlines up slightly).
    assert audio.deadlines and all(d is not None and 0 < d <= 31 for d in audio.deadlines)


def clips_of_kind(events, kind) -> list:
    result = ImageResult("x")
    for e in events:
        result.add(e)
    return [c for c in result.clips if c.ref.kind == kind]


async def test_scene_mix_is_streamed_as_its_own_clip(image_bytes):
    async with fake_stack() as (target, _, _):
        events = await asyncio.wait_for(
            run_one(target, image_bytes, duration_seconds=1, options=pb.PipelineOptions(scene_mix=True)), BOUND)
    mix = clips_of_kind(events, pb.CLIP_KIND_SCENE_MIX)
    assert len(mix) == 1 and mix[0].file_name == "scene_mix.wav" and mix[0].done
    wave = mix[0].waveform
    assert mix[0].channels == 2 and wave.shape == (16000, 2) and np.std(wave) > 0.001
    assert mix[0].metadata.peak_dbfs <= -1.0 + 1e-3 and mix[0].metadata.HasField("loudness_lufs")
    assert len(mix[0].mix.stems) == len(clips_of_kind(events, pb.CLIP_KIND_VARIANT))  # the data that rebuilds it


async def test_scene_mix_follows_the_clips_sample_rates(image_bytes):
    # Clips at 24 kHz and 16 kHz (e.g. two different audio models): the mix is at the higher rate, as long as
    # the clips (1 s), and every clip's tone is in it, none pitch-shifted by a rate mix-up.
    audio = FakeAudioServicer(sample_rates=(24000, 16000))
    vision = FakeVisionServicer(description=scripted_description(sources=1, variants=2))
    async with fake_stack(vision=vision, audio=audio) as (target, _, _):
        events = await asyncio.wait_for(
            run_one(target, image_bytes, duration_seconds=1, options=pb.PipelineOptions(scene_mix=True)), BOUND)
    assert sorted(c.sample_rate_hertz for c in clips_of_kind(events, pb.CLIP_KIND_VARIANT)) == [16000, 24000]
    (mix,) = clips_of_kind(events, pb.CLIP_KIND_SCENE_MIX)
    assert mix.sample_rate_hertz == mix.metadata.sample_rate_hertz == 24000
    assert mix.waveform.shape == (24000, 2) and abs(mix.metadata.duration_seconds - 1.0) < 1e-6
    spectrum = np.abs(np.fft.rfft(mix.waveform.sum(axis=1)))  # 1 s at 24 kHz: bin i is i Hz
    assert sorted(np.argsort(spectrum)[-2:].tolist()) == [201, 202]  # the fake's tones: 200 Hz + call number


async def test_a_variant_with_nothing_to_caption_fails_alone(image_bytes):
    description = scripted_description(2, 1)
    description.sources[0].name = "],"
    description.sources[0].material = ""
    description.sources[0].variants[0].action = "..."
    async with fake_stack() as (target, _, audio):
        events = await asyncio.wait_for(run_one(target, None, description=description, duration_seconds=1), BOUND)
    failed = [e.clip_failed for e in events if e.WhichOneof("event") == "clip_failed"]
    assert len(failed) == 1 and failed[0].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert events[-1].summary.clips_done == 1 and len(audio.prompts) == 1


async def test_orchestrator_health_follows_the_model_services():
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    async with fake_stack() as (target, vision, audio):
        async with grpc.aio.insecure_channel(target) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))

            async def next_status():
                return (await asyncio.wait_for(watch.read(), BOUND)).status

            assert await next_status() == serving
            await audio.grpc_server.set_serving(False)  # e.g. the audio service is reloading
            assert await next_status() == not_serving
            await audio.grpc_server.set_serving(True)
            assert await next_status() == serving
            await vision.grpc_server.stop()  # the VLM service is gone
            assert await next_status() == not_serving
            watch.cancel()


@pytest.mark.parametrize("sent", [
    common_pb2.AudioSettings(),  # every value the contract's default
    common_pb2.AudioSettings(scheduler=common_pb2.SCHEDULER_DDIM, duration_seconds=2.5, seed=7, negative_prompt="hum"),
    common_pb2.AudioSettings(sample_rate_hertz=48000, loudness_target_lufs=-16),  # material for music
])
async def test_the_model_services_receive_exactly_what_the_orchestrator_resolved(image_bytes, sent):
    """Validated once, handed on: the orchestrator resolves the request (i2s_formats.contract) and sends every
    resolved value set, so an audio service of another version applies no default of its own mid-rollout.
    Only the seed and the negative prompt stay unset when the caller sets none (a fresh draw per clip, and the
    audio deployment's --negative-prompt: docs/architecture.md "The request contract")."""
    from i2s_formats import contract

    request = make_request(image_bytes, request_id="r", audio=sent)
    resolved = contract.image_to_sound(request, max_clips_per_image=32)
    vision = FakeVisionServicer(description=scripted_description(sources=1, variants=2))
    async with fake_stack(vision=vision) as (target, vision, audio):
        async with AsyncImageToSoundClient(target) as client:
            result = await asyncio.wait_for(client.generate(image_bytes, request_id="r", audio=sent), BOUND)
    assert result.ok, result
    assert len(audio.settings) == 2 and all(s == resolved.audio.to_proto(resolved.output) for s in audio.settings)
    for received in audio.settings:
        for name in ("duration_seconds", "num_inference_steps", "num_candidates", "scheduler", "encoding",
                     "chunk_duration_seconds"):
            assert getattr(received, name), name  # set: no zero left for the audio service to default
        assert received.HasField("guidance_scale")
        assert received.HasField("seed") == sent.HasField("seed")
        assert received.HasField("negative_prompt") == sent.HasField("negative_prompt")
        # What the audio service makes of them is what the orchestrator resolved.
        assert contract.clip_settings(received) == resolved.audio
        assert contract.audio_output(received) == resolved.output
    expected_steps = 200 if sent.scheduler == common_pb2.SCHEDULER_DDIM else 20
    assert audio.settings[0].num_inference_steps == expected_steps
    assert vision.decoding == [resolved.decoding.to_proto()] and vision.decoding[0].max_new_tokens == 1024
