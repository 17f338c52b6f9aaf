"""The orchestrator refuses at its edge what the audio service would refuse for every clip of a request (its
GetAudioLimits answer: the longest clip, the speech/music guard), before the VLM runs; an audio service
without the RPC (an older version) leaves the check to its own edge. The audio service's answer comes from
its settings and its backend. FAKE model services and a FAKE audio backend (orchestration logic only)."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc
import pytest

from audio_service.config import AudioConfig
from audio_service.server import AudioServicer
from image_to_sound.v1 import audio_pb2, orchestrator_pb2 as pb
from orchestrator.audio_limits import AudioLimits
from tests.fake_services import FakeAudioServicer, fake_stack
from tests.unit.test_batching import FakeCountingAudioBackend
from tests.unit.test_orchestrator import image_bytes, run_one  # noqa: F401 (image_bytes is a fixture)

BOUND = 30.0


@dataclass
class LimitedAudioServicer(FakeAudioServicer):
    """The fake audio service (NOT a model), answering GetAudioLimits: 5 s at most, no guard."""

    limits: audio_pb2.AudioLimits = field(
        default_factory=lambda: audio_pb2.AudioLimits(max_clip_seconds=5.0, speech_music_guard=False))

    async def GetAudioLimits(self, request, context):
        return self.limits


async def refused(target, image, **kwargs) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await asyncio.wait_for(run_one(target, image, **kwargs), BOUND)
    return info.value


async def test_a_request_beyond_what_the_audio_service_makes_is_refused_before_the_vlm_runs(image_bytes):
    async with fake_stack(audio=LimitedAudioServicer()) as (target, vision, audio):
        too_long = await refused(target, image_bytes, duration_seconds=8.0)
        assert too_long.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert too_long.details() == "audio.duration_seconds=8: the audio service makes clips of at most 5 s"
        guarded = await refused(target, image_bytes, duration_seconds=2.0, reject_speech_music=1)
        assert guarded.code() == grpc.StatusCode.INVALID_ARGUMENT and "no speech/music guard" in guarded.details()
        assert vision.calls == 0 and audio.prompts == []  # refused at the edge: no model service was called
        # At the limit it runs; without audio, audio settings are not held against the request.
        events = await asyncio.wait_for(run_one(target, image_bytes, duration_seconds=5.0), BOUND)
        assert events[-1].summary.clips_done > 0
        events = await asyncio.wait_for(run_one(target, image_bytes, duration_seconds=8.0,
                                                options=pb.PipelineOptions(skip_audio=True)), BOUND)
        assert events[-1].WhichOneof("event") == "summary"


async def test_an_audio_service_without_the_rpc_leaves_the_check_to_its_own_edge(image_bytes):
    async with fake_stack(audio=FakeAudioServicer()) as (target, _, audio):  # UNIMPLEMENTED: an older version
        events = await asyncio.wait_for(run_one(target, image_bytes, duration_seconds=8.0), BOUND)
        assert events[-1].summary.clips_done == len(audio.prompts) > 0


class ScriptedStub:
    """NOT a service: answers GetAudioLimits with the next of `answers` (an AudioLimits, or a status to fail with)."""

    def __init__(self, *answers):
        self.answers = list(answers)

    async def GetAudioLimits(self, request, timeout=None):
        answer = self.answers.pop(0)
        if isinstance(answer, grpc.StatusCode):
            raise grpc.aio.AioRpcError(answer, grpc.aio.Metadata(), grpc.aio.Metadata(), details="scripted")
        return answer


async def test_an_unreachable_audio_service_keeps_the_last_answer_and_an_older_one_clears_it():
    limits = AudioLimits()
    first = audio_pb2.AudioLimits(max_clip_seconds=12.0, speech_music_guard=True)
    stub = ScriptedStub(first, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNIMPLEMENTED)
    await limits.ask(stub)
    assert limits.known == first
    await limits.ask(stub)  # restarting: the last answer stands
    assert limits.known == first
    await limits.ask(stub)  # rolled back to a version without the RPC: no edge check
    assert limits.known is None


async def test_the_audio_service_reports_its_setting_and_a_backend_without_windows_makes_one_calls_length():
    """FakeCountingAudioBackend has no model windows and does not score clips (as the Triton backend)."""
    for setting, expected in ((300.0, 30.0), (12.5, 12.5)):
        servicer = AudioServicer(FakeCountingAudioBackend(), AudioConfig(model="fake", max_clip_seconds=setting))
        try:
            assert servicer.limits() == audio_pb2.AudioLimits(max_clip_seconds=expected, speech_music_guard=False)
        finally:
            await servicer.close()
