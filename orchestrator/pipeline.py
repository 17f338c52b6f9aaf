"""Chaining the VLM and audio services for one image, pipelined.

The VLM streams sound sources as it decodes them; the moment a new variant appears, its clip is
requested from the audio service, while the VLM is still describing the rest. Events from the VLM
reader and from every clip go through one bounded queue to the caller: a slow caller slows the
producers down (backpressure) instead of growing memory. Audio calls in flight are bounded for the
whole server by one semaphore shared by all images.
"""
from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import grpc

from image_to_sound.v1 import audio_pb2, audio_pb2_grpc, common_pb2, orchestrator_pb2 as pb, vision_pb2, vision_pb2_grpc
from orchestrator import mix
from orchestrator.naming import clip_file_name
from orchestrator import prompts
from i2s_formats import audio_encoding, stereo_mix
from i2s_formats.contract import PRIORITY_ENUM, ImageRequest
from i2s_formats.source_merge import SourceMerge
from serving import metrics, request_log, tracing
from serving.config import setting
from serving.deadline import Deadline
from serving.errors import Upstream, excerpt
from serving.pump import Pump

log = logging.getLogger(__name__)
# Messages written by our own model services about the request itself: safe and useful to pass on.
_PASS_ON = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.NOT_FOUND}
_ADDRESS = re.compile(r"\b(?:dns|unix|ipv[46]):[^\s,;)]*|\[[0-9a-fA-F:.]+\](?::\d+)?|\b[0-9a-fA-F.:]*[0-9a-fA-F]:\d{2,5}\b")


def downstream_message(service: str, code: grpc.StatusCode, details: str | None) -> str:
    """What a client is told about a failed model-service call: our services' own messages (bounded), else
    a generic line per code. gRPC's transport details name internal addresses ("ipv4:10.0.3.7:50052:
    Connection refused"): those stay in the server log."""
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"{service} unavailable; retry later"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"{service}: deadline exceeded"
    if code == grpc.StatusCode.CANCELLED:
        return f"{service}: cancelled"
    if code not in _PASS_ON:
        return f"{service} failed ({code.name})"
    text = _ADDRESS.sub("<address>", details or code.name)
    return f"{service}: {text[:200]}" + ("..." if len(text) > 200 else "")


@dataclass(frozen=True)
class PipelineLimits:
    max_audio_calls: int = setting(8, "audio requests in flight, all images together")
    max_clips_per_image: int = 32
    event_queue_size: int = 64  # events buffered per image before producers wait for the caller


@dataclass
class _Clip:
    ref: pb.ClipRef
    prompt: str
    payloads: list[bytes] = field(default_factory=list)
    encoding: int = 0
    sample_rate_hertz: int = 0  # as the audio service's chunks say
    ok: bool = False
    failed: tuple[grpc.StatusCode, str] | None = None  # the ClipFailed's code and message


class Pipeline:
    """Shared by all requests of an orchestrator: the stubs and the audio concurrency bound."""

    def __init__(self, vlm: vision_pb2_grpc.VisionServiceStub | None, audio: audio_pb2_grpc.AudioServiceStub | None,
                 limits: PipelineLimits = PipelineLimits(), overloaded_retries: int = 3):
        self.vlm = vlm
        self.audio = audio
        self.limits = limits
        self.audio_slots = asyncio.Semaphore(limits.max_audio_calls)
        self.overloaded_retries = overloaded_retries

    def run(self, request: ImageRequest, deadline: Deadline, clip_prefix: str | None = None):
        """The events of one image (resolved by the request contract), as an async iterator. Closing it
        early cancels all downstream calls. `clip_prefix` (default: the request id) starts every clip id."""
        return _ImageRun(self, request, deadline, clip_prefix).events()

    async def retried_when_overloaded(self, open_call: Callable[[], AsyncIterator], deadline: Deadline) -> AsyncIterator:
        """The responses of a streaming model call, opened again (jittered, doubling waits) while it is
        refused RESOURCE_EXHAUSTED before it sent anything: asking again then repeats nothing (no description
        twice, no audio chunk twice). Gives up when retries are used up or a wait would pass the deadline."""
        attempt = 0
        while True:
            received = False
            try:
                async for response in open_call():
                    received = True
                    yield response
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or received or attempt >= self.overloaded_retries:
                    raise
                pause = 0.1 * 2**attempt * (0.5 + random.random())
                left = deadline.left()
                if left is not None and left <= pause:
                    raise
                attempt += 1
                await asyncio.sleep(pause)


class _ImageRun:
    def __init__(self, pipeline: Pipeline, request: ImageRequest, deadline: Deadline, clip_prefix: str | None = None):
        self.p = pipeline
        self.request = request
        self.request_id = request.request_id
        self.clip_prefix = clip_prefix or self.request_id
        self.call_metadata = ((request_log.REQUEST_ID_HEADER, self.request_id),)  # the model services log it
        self.deadline = deadline
        # Every clip's settings as resolved at the edge, all set: the audio service applies no default of its own.
        self.audio_settings = request.audio.to_proto(request.output)
        # The priority and cache flag, as every model call of the image sends them.
        self.handling = dict(priority=PRIORITY_ENUM[request.handling.priority],
                             bypass_cache=request.handling.bypass_cache)
        self.out: Pump | None = None  # the image's events, to the caller (made when the events are read)
        self.clip_tasks: list[asyncio.Future] = []
        self.clips: list[_Clip] = []
        self.sources = SourceMerge()
        self.scene = ("", "")
        self.variants = 0
        self.started = time.perf_counter()
        self.t_scene = 0.0
        self.t_first_audio = 0.0
        self.vlm_stats: common_pb2.DescriptionStats | None = None
        self.describing = False  # the VLM stream is open
        self.clips_started_while_describing = 0
        self.first_audio_while_describing = False

    def _event(self, **kwargs) -> pb.ImageToSoundEvent:
        return pb.ImageToSoundEvent(request_id=self.request_id, **kwargs)

    async def _emit(self, **kwargs) -> None:
        await self.out.put(self._event(**kwargs))

    def _since_start(self) -> float:
        return time.perf_counter() - self.started

    async def events(self):
        async with Pump(self.p.limits.event_queue_size) as self.out:  # leaving cancels the describer and clips
            self.out.spawn(self._produce_in_span())
            async for event in self.out:
                yield event

    async def _produce_in_span(self) -> None:
        with tracing.current_span("orchestrator.image", self.request_id):  # the model calls become its children
            await self._produce()

    async def _produce(self) -> None:
        if self.request.description is None:
            await self._describe()
        else:
            await self._replay(self.request.description)
        await asyncio.gather(*self.clip_tasks)
        if self.request.scene_mix:
            await self._emit_mix()
        summary = self._summary()
        request_log.note(time_to_scene_s=summary.time_to_scene_seconds,
                         time_to_first_audio_s=summary.time_to_first_audio_seconds,
                         sources=summary.sources, clips_done=summary.clips_done, clips_failed=summary.clips_failed)
        await self._emit(summary=summary)

    # --- describing ---------------------------------------------------------------------------
    async def _describe(self) -> None:
        if self.p.vlm is None:
            raise Upstream(grpc.StatusCode.FAILED_PRECONDITION, "this orchestrator has no vision service; send a description")
        self.describing = True
        message = vision_pb2.StreamSceneDescriptionRequest(image=self.request.image,
                                                           decoding=self.request.decoding.to_proto(), **self.handling)
        try:
            async for response in self.p.retried_when_overloaded(lambda: self.p.vlm.StreamSceneDescription(
                    message, timeout=self.deadline.left(), metadata=self.call_metadata), self.deadline):
                kind = response.WhichOneof("event")
                if kind == "scene":
                    await self._on_scene(response.scene.scene, response.scene.mood)
                elif kind == "source":
                    await self._on_source(response.source)
                elif kind == "final":
                    self.describing = False
                    self.vlm_stats = response.final.stats
                    await self._emit(description=response.final.description)
        except grpc.aio.AioRpcError as exc:
            log.info("image %s: vision service: %s %s", self.request_id, exc.code().name, excerpt(exc.details(), 300))
            raise Upstream(exc.code(), downstream_message("vision service", exc.code(), exc.details())) from None
        finally:
            self.describing = False

    async def _replay(self, description: common_pb2.SceneDescription) -> None:
        """A description made earlier (the seed's --skip_vlm; cleaned by the contract): same events, no VLM."""
        await self._on_scene(description.scene, description.mood)
        for source in description.sources:
            await self._on_source(source)
        await self._emit(description=description)

    async def _on_scene(self, scene: str, mood: str) -> None:
        self.scene = (scene, mood)
        self.t_scene = self._since_start()
        await self._emit(scene=vision_pb2.SceneSummary(scene=scene, mood=mood))

    async def _on_source(self, source: common_pb2.SoundSource) -> None:
        merged, new = self.sources.add(source)
        await self._emit(source=source)
        for variant in new:
            self.variants += 1
            self._start_clip(merged, variant)

    # --- audio --------------------------------------------------------------------------------
    def _start_clip(self, source: common_pb2.SoundSource, variant: common_pb2.SoundVariant) -> None:
        if self.request.skip_audio or len(self.clips) >= self.request.max_clips:
            return
        index = len(self.clips) + 1
        ref = pb.ClipRef(
            clip_id=f"{self.clip_prefix}-{index:02d}", kind=pb.CLIP_KIND_VARIANT, source_id=source.id,
            variant_id=variant.id, index=index, file_name=clip_file_name(index, source.name, variant.action),
        )
        clip = _Clip(ref=ref, prompt="")
        self.clips.append(clip)
        self.clips_started_while_describing += self.describing
        try:
            clip.prompt = prompts.caption_for_variant(self.scene[0], self.scene[1], source, variant)
        except ValueError as exc:  # nothing in the variant to caption: this clip fails, the image goes on
            self.clip_tasks.append(self.out.spawn(self._fail(clip, grpc.StatusCode.INVALID_ARGUMENT, str(exc))))
            return
        self.clip_tasks.append(self.out.spawn(self._render_in_span(clip)))

    async def _fail(self, clip: _Clip, code: grpc.StatusCode, message: str) -> None:
        log.warning("clip %s failed: %s %s", clip.ref.clip_id, code.name, message)
        clip.failed = (code, message)
        await self._emit(clip_failed=pb.ClipFailed(clip=clip.ref, code=code.value[0], message=message))

    async def _render_in_span(self, clip: _Clip) -> None:
        with tracing.current_span("orchestrator.clip", self.request_id, **{"i2s.clip_id": clip.ref.clip_id}) as span:
            await self._render(clip)
            if clip.failed:  # reported to the caller as ClipFailed, and on the span as the error it is
                span.fail(*clip.failed)

    async def _render(self, clip: _Clip) -> None:
        """One clip: an audio RPC whose chunks are forwarded as they come. Failures become ClipFailed."""
        try:
            if self.p.audio is None:
                raise Upstream(grpc.StatusCode.FAILED_PRECONDITION, "this orchestrator has no audio service")
            async with self.p.audio_slots:
                metadata = None
                message = audio_pb2.GenerateAudioRequest(prompt=clip.prompt, settings=self.audio_settings,
                                                         clip_id=clip.ref.clip_id, **self.handling)
                async for response in self.p.retried_when_overloaded(lambda: self.p.audio.GenerateAudio(
                        message, timeout=self.deadline.left(), metadata=self.call_metadata), self.deadline):
                    if response.WhichOneof("event") != "chunk":
                        continue
                    chunk = response.chunk
                    if not self.t_first_audio:
                        self.t_first_audio = self._since_start()
                        metrics.TIME_TO_FIRST_AUDIO.observe(self.t_first_audio)
                        self.first_audio_while_describing = self.describing
                    if self.request.scene_mix:
                        clip.payloads.append(chunk.data)
                        clip.encoding, clip.sample_rate_hertz = chunk.encoding, chunk.sample_rate_hertz
                    await self._emit(audio=pb.ClipAudio(clip=clip.ref, chunk=chunk))
                    if chunk.last:
                        metadata = chunk.metadata
                if metadata is None:
                    raise Upstream(grpc.StatusCode.INTERNAL, "audio stream ended without its last chunk")
            clip.ok = True
            await self._emit(clip_done=pb.ClipDone(clip=clip.ref, prompt=clip.prompt, metadata=metadata,
                                                   prompt_style=prompts.PROMPT_STYLE_VERSION))
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as exc:
            log.info("clip %s: audio service: %s %s", clip.ref.clip_id, exc.code().name, excerpt(exc.details(), 300))
            await self._fail(clip, exc.code(), downstream_message("audio service", exc.code(), exc.details()))
        except (Upstream, TimeoutError) as exc:
            code = getattr(exc, "code", grpc.StatusCode.DEADLINE_EXCEEDED)
            await self._fail(clip, code, f"audio service: {exc}")

    async def _emit_mix(self) -> None:
        stems = [self._stem(c) for c in self.clips if c.ok]
        if not stems:
            return
        result = await asyncio.to_thread(mix.scene_mix, stems, self.request.output.loudness_target_lufs)
        ref = pb.ClipRef(clip_id=f"{self.clip_prefix}-mix", kind=pb.CLIP_KIND_SCENE_MIX, file_name=mix.FILE_NAME)
        encoding, chunk_seconds = self.request.output.encoding, self.request.output.chunk_seconds
        metadata = mix.metadata(result)
        for chunk in audio_encoding.audio_chunks(ref.clip_id, result.samples, result.rate, encoding, chunk_seconds,
                                                 metadata):
            await self._emit(audio=pb.ClipAudio(clip=ref, chunk=chunk))
        await self._emit(clip_done=pb.ClipDone(clip=ref, prompt=metadata.prompt, metadata=metadata, mix=result.plan))

    def _stem(self, clip: _Clip) -> stereo_mix.StemIn:
        source = self.sources.get(clip.ref.source_id)
        location = source.location if source is not None and source.HasField("location") else None
        return stereo_mix.StemIn(clip.ref.clip_id, clip.ref.file_name,
                                 audio_encoding.decode_payloads(clip.payloads, clip.encoding), clip.sample_rate_hertz,
                                 location)

    def _summary(self) -> pb.ImageSummary:
        summary = pb.ImageSummary(
            sources=len(self.sources),
            variants=self.variants,
            clips_done=sum(c.ok for c in self.clips),
            clips_failed=sum(not c.ok for c in self.clips),
            time_to_first_audio_seconds=self.t_first_audio,
            time_to_scene_seconds=self.t_scene,
            total_seconds=self._since_start(),
            clips_started_while_describing=self.clips_started_while_describing,
            first_audio_while_describing=self.first_audio_while_describing,
        )
        if self.vlm_stats is not None:
            summary.vlm_stats.CopyFrom(self.vlm_stats)
        return summary
