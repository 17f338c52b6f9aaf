"""Every row of the bad-input catalogue (tests/bad_inputs.py) through every public RPC that takes its field,
on the real services with the tiny checkpoints: the expected status and message, bounded echoes, and for
the orchestrator, refusal before any model call."""
from __future__ import annotations

import re

import grpc
import pytest
import pytest_asyncio

from image_to_sound.v1 import (audio_pb2, audio_pb2_grpc, common_pb2, orchestrator_pb2 as pb, orchestrator_pb2_grpc,
                               vision_pb2, vision_pb2_grpc)
from serving import metrics
from tests.bad_inputs import CATALOGUE, OK, Case, set_field
from tests.real_stack import png, real_stack

TIMEOUT = 120
SMALL = common_pb2.DecodingSettings(max_new_tokens=16)  # accepted images: the tiny VLM says a little and stops
FAST_AUDIO = common_pb2.AudioSettings(duration_seconds=1, num_inference_steps=2, seed=1)
RPCS_BY_FIELD = {
    "image": ("DescribeScene", "StreamSceneDescription", "ImageToSound", "StreamImagesToSound"),
    "decoding": ("DescribeScene", "StreamSceneDescription", "ImageToSound", "StreamImagesToSound"),
    "audio": ("GenerateAudio", "ImageToSound", "StreamImagesToSound"),
    "options": ("ImageToSound", "StreamImagesToSound"),
    "prompt": ("GenerateAudio",),
    "request_id": ("ImageToSound", "StreamImagesToSound"),
    "description": ("ImageToSound", "StreamImagesToSound"),
}
ORCHESTRATOR = {"ImageToSound", "StreamImagesToSound"}
SAFE_FILE_NAME = re.compile(r"^\d\d_[a-z0-9_]+_[a-z0-9_]+\.wav$")


@pytest_asyncio.fixture(scope="module")
async def stubs(tiny_vlm_dir, tiny_audio_dir):
    options = [("grpc.max_send_message_length", 64 * 1024 * 1024), ("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    async with real_stack(tiny_vlm_dir, tiny_audio_dir) as stack:
        channels = [grpc.aio.insecure_channel(t, options=options) for t in (stack.vlm_target, stack.audio_target, stack.target)]
        yield (vision_pb2_grpc.VisionServiceStub(channels[0]), audio_pb2_grpc.AudioServiceStub(channels[1]),
               orchestrator_pb2_grpc.OrchestratorStub(channels[2]))
        for channel in channels:
            await channel.close()


def vlm_calls() -> float:
    """StreamSceneDescription calls finished so far (all codes), from the in-process metrics."""
    return sum(s.value for m in metrics.RPCS.collect() for s in m.samples
               if s.name.endswith("_total") and s.labels.get("method") == "StreamSceneDescription")


def orchestrator_request(case: Case, value) -> pb.ImageToSoundRequest:
    request = pb.ImageToSoundRequest(request_id="catalogue", decoding=SMALL, audio=FAST_AUDIO,
                                     options=pb.PipelineOptions(skip_audio=True))
    request.image.data = png()
    if case.field in ("audio", "description"):  # render: the audio settings count, clip names come from the names
        request.options.skip_audio = False
    return set_field(request, case, value)


async def call(rpc: str, case: Case, stubs) -> tuple[grpc.StatusCode, str, list]:
    """(status code, message, events) of one row through one RPC; ImageFailed counts as the image's status."""
    vision, audio, orchestrator = stubs
    value = case.make()
    try:
        if rpc in ("DescribeScene", "StreamSceneDescription"):
            image = common_pb2.Image(data=png())
            decoding = SMALL
            if case.field == "image":
                image = common_pb2.Image(data=value[0], mime_type=value[1])
            else:
                decoding = value
            if rpc == "DescribeScene":
                return OK, "", [await vision.DescribeScene(vision_pb2.DescribeSceneRequest(image=image, decoding=decoding),
                                                           timeout=TIMEOUT)]
            return OK, "", [r async for r in vision.StreamSceneDescription(
                vision_pb2.StreamSceneDescriptionRequest(image=image, decoding=decoding), timeout=TIMEOUT)]
        if rpc == "GenerateAudio":
            prompt, settings = ("rain on a tin roof", value) if case.field == "audio" else (value, FAST_AUDIO)
            return OK, "", [r async for r in audio.GenerateAudio(
                audio_pb2.GenerateAudioRequest(prompt=prompt, settings=settings), timeout=TIMEOUT)]
        request = orchestrator_request(case, value)
        if rpc == "ImageToSound":
            return OK, "", [e async for e in orchestrator.ImageToSound(request, timeout=TIMEOUT)]
        events = [e async for e in orchestrator.StreamImagesToSound(
            iter([pb.StreamImagesToSoundRequest(image=request)]), timeout=TIMEOUT)]
        failed = [e.image_failed for e in events if e.WhichOneof("event") == "image_failed"]
        if failed:
            return grpc.StatusCode(next(c for c in grpc.StatusCode if c.value[0] == failed[0].code)), failed[0].message, events
        return OK, "", events
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or "", []


ROWS = [pytest.param(case, rpc, id=f"{rpc}-{case.name}") for case in CATALOGUE for rpc in RPCS_BY_FIELD[case.field]]


@pytest.mark.parametrize("case,rpc", ROWS)
async def test_catalogue_row(case: Case, rpc: str, stubs):
    vlm_before = vlm_calls()
    code, message, events = await call(rpc, case, stubs)
    assert code == case.code, (code, message[:300])
    assert len(message) < 1000  # no echo of a megabyte of input
    if code != OK:
        assert case.fragment in message, message
        if rpc in ORCHESTRATOR and code == grpc.StatusCode.INVALID_ARGUMENT and case.field != "image":
            assert vlm_calls() == vlm_before  # refused before the VLM was asked
        return
    for event in events:
        if rpc in ORCHESTRATOR:
            assert event.request_id.isprintable() and 0 < len(event.request_id) <= 128
            assert event.WhichOneof("event") != "clip_failed", event.clip_failed.message
            if event.WhichOneof("event") == "source":
                assert event.source.name.isprintable() and len(event.source.name) <= 60
            if event.WhichOneof("event") == "clip_done":
                assert SAFE_FILE_NAME.match(event.clip_done.clip.file_name), event.clip_done.clip.file_name
    if case.field == "description":
        assert any(e.WhichOneof("event") == "clip_done" for e in events)
    if rpc in ORCHESTRATOR:
        assert events[-1].WhichOneof("event") == "summary"
