"""Fake model services for testing orchestration logic only (no model behind them, as the names say).

They speak the real gRPC contract on real loopback servers, so the orchestrator under test is the real
one; what they return is scripted. Tests that claim to exercise a model use the tiny checkpoints instead.
"""
from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import numpy as np

from image_to_sound.v1 import audio_pb2, audio_pb2_grpc, common_pb2, vision_pb2, vision_pb2_grpc
from i2s_formats import audio_encoding, loudness
from serving.errors import InvalidInput
from serving.images import decode_image
from serving.server import GrpcServer, ServerOptions

RATE = 16000


def scripted_description(sources: int = 3, variants: int = 2) -> common_pb2.SceneDescription:
    description = common_pb2.SceneDescription(scene="a rainy street", mood="calm", prompt_version="fake", model_id="fake")
    for s in range(1, sources + 1):
        source = description.sources.add(id=f"s{s}", name=f"source {s}", material="metal")
        for v in range(1, variants + 1):
            source.variants.add(id=f"s{s}v{v}", action=f"action {v}", timbre=["sharp"],
                                instrument_role=common_pb2.INSTRUMENT_ROLE_DRUMS, confidence=0.9)
    return description


@dataclass
class FakeVisionServicer(vision_pb2_grpc.VisionServiceServicer):
    """Streams a scripted description. If `hold_after_first_source` is set, the rest of the stream waits
    until `release` is set: a test can then prove that audio started before the VLM finished.
    `hold_before_scene` holds the whole stream the same way (nothing sent yet); `was_cancelled` is set
    when a held call is cancelled."""

    description: common_pb2.SceneDescription = field(default_factory=scripted_description)
    hold_after_first_source: bool = False
    hold_before_scene: bool = False
    release: asyncio.Event = field(default_factory=asyncio.Event)
    entered: asyncio.Event = field(default_factory=asyncio.Event)  # set when a call starts
    was_cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    finished: bool = False
    calls: int = 0
    decoding: list[common_pb2.DecodingSettings] = field(default_factory=list)  # as each call received them
    requests: list = field(default_factory=list)  # every request, as received

    async def StreamSceneDescription(self, request, context):
        self.calls += 1
        self.requests.append(request)
        self.decoding.append(request.decoding)
        decode_image(request.image.data, request.image.mime_type)  # the real checks: bad images fail here
        self.entered.set()
        if self.hold_before_scene:
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.was_cancelled.set()
                raise
        yield vision_pb2.StreamSceneDescriptionResponse(
            scene=vision_pb2.SceneSummary(scene=self.description.scene, mood=self.description.mood))
        for i, source in enumerate(self.description.sources):
            yield vision_pb2.StreamSceneDescriptionResponse(source=source)
            if i == 0 and self.hold_after_first_source:
                await self.release.wait()
        self.finished = True
        yield vision_pb2.StreamSceneDescriptionResponse(final=vision_pb2.DescribeSceneResponse(
            description=self.description, stats=common_pb2.DescriptionStats(prompt_tokens=10, output_tokens=20)))


@dataclass
class FakeAudioServicer(audio_pb2_grpc.AudioServiceServicer):
    """Returns a sine clip of the requested length; fails prompts containing `fail_word`. Successive calls
    answer at the successive rates of `sample_rates` (a model other than AudioLDM2's 16 kHz, or a mixed fleet)."""

    fail_word: str = "\x00never"
    model_id: str = "fake"  # what the clips' metadata says (which replica answered)
    sample_rates: tuple[int, ...] = (RATE,)
    prompts: list[str] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    cancelled: int = 0
    gate: asyncio.Event | None = None  # when set, every call waits for it before answering
    entered: asyncio.Event = field(default_factory=asyncio.Event)  # set when a call starts
    was_cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    deadlines: list[float | None] = field(default_factory=list)  # time remaining seen by each call
    settings: list[common_pb2.AudioSettings] = field(default_factory=list)  # as each call received them
    requests: list = field(default_factory=list)  # every request, as received

    async def GenerateAudio(self, request, context):
        self.prompts.append(request.prompt)
        self.requests.append(request)
        self.settings.append(request.settings)
        self.deadlines.append(context.time_remaining())
        self.entered.set()
        if self.fail_word in request.prompt:
            raise InvalidInput("scripted failure")
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            seconds = request.settings.duration_seconds or 4.0
            rate = self.sample_rates[(len(self.prompts) - 1) % len(self.sample_rates)]
            t = np.arange(int(round(seconds * rate))) / rate
            wave = (0.3 * np.sin(2 * np.pi * (200 + len(self.prompts)) * t)).astype(np.float32)
            yield audio_pb2.GenerateAudioResponse(progress=common_pb2.Progress(steps_done=1, steps_total=1))
            encoding = request.settings.encoding or audio_encoding.PCM16
            settings = request.settings
            target = settings.loudness_target_lufs if settings.HasField("loudness_target_lufs") else None
            out = loudness.deliver(wave, rate, request.settings.sample_rate_hertz, target)  # the service's output step
            metadata = common_pb2.ClipMetadata(duration_seconds=seconds, sample_rate_hertz=out.rate,
                                               num_samples=len(out.samples), seed=request.settings.seed,
                                               prompt=request.prompt, model_id=self.model_id)
            loudness.record(metadata, out.level, out.gain_db)
            for chunk in audio_encoding.audio_chunks(request.clip_id, out.samples, out.rate, encoding, 0.5, metadata):
                yield audio_pb2.GenerateAudioResponse(chunk=chunk)
        except asyncio.CancelledError:
            self.cancelled += 1
            self.was_cancelled.set()
            raise
        finally:
            self.in_flight -= 1


@contextlib.asynccontextmanager
async def serve(servicer, add_fn, service_name: str):
    """A real grpc.aio server on an ephemeral loopback port, SERVING, for the duration of the block."""
    server = GrpcServer(ServerOptions(host="127.0.0.1", port=0, grace_seconds=0.5), lambda s: add_fn(servicer, s),
                        [service_name])
    await server.start()
    await server.set_serving(True)
    try:
        yield server
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def fake_stack(vision: FakeVisionServicer | None = None, audio: FakeAudioServicer | None = None, **limits):
    """Fake VLM + fake audio + the REAL orchestrator, all on loopback. Yields (orchestrator target, vision, audio)."""
    from orchestrator.config import OrchestratorConfig
    from orchestrator.pipeline import PipelineLimits
    from orchestrator.server import Orchestrator

    vision = vision or FakeVisionServicer()
    audio = audio or FakeAudioServicer()
    async with serve(vision, vision_pb2_grpc.add_VisionServiceServicer_to_server, "image_to_sound.v1.VisionService") as v, \
            serve(audio, audio_pb2_grpc.add_AudioServiceServicer_to_server, "image_to_sound.v1.AudioService") as a:
        vision.grpc_server, audio.grpc_server = v, a  # tests flip their health or stop them
        config = OrchestratorConfig(vlm_target=v.address, audio_target=a.address,
                                    limits=PipelineLimits(**limits), server=ServerOptions(port=0, grace_seconds=0.5))
        orchestrator = Orchestrator(config)
        await orchestrator.server.start()
        await orchestrator.wait_for_backends(timeout=10)
        await orchestrator.server.set_serving(True)
        try:
            yield orchestrator.server.address, vision, audio
        finally:
            await orchestrator.server.stop()
            await orchestrator.close()
