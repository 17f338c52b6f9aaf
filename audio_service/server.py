"""AudioService servicer: gRPC messages in, batched backend calls, audio chunks out. No model logic here."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Sequence

import grpc

import numpy as np

from audio_service import clip_maker
from audio_service.backend import AudioBackend, AudioResult
from audio_service.batching import Batcher
from audio_service.clip_cache import clip_key, pack_clip, unpack_clip
from audio_service.config import AudioConfig, effective_buckets, effective_max_batch_size
from image_to_sound.v1 import audio_pb2, audio_pb2_grpc, common_pb2
from i2s_formats import audio_encoding, contract, loudness
from i2s_formats.chunk_stream import ChunkStream
from serving import fast_path, metrics, request_log, tracing
from serving.deadline import Deadline
from serving.errors import InvalidInput, NotReady
from serving.priority import PriorityOrder
from serving.pump import Pump
from serving.result_cache import open_cache
from serving.server import GrpcServer

log = logging.getLogger(__name__)
SERVICE_NAME = audio_pb2.DESCRIPTOR.services_by_name["AudioService"].full_name
QUEUE = "audio_batch"  # its i2s_queue_depth label: the waiting work the autoscalers read (deploy/README.md "Scaling")

class AudioServicer(audio_pb2_grpc.AudioServiceServicer):
    def __init__(self, backend: AudioBackend, config: AudioConfig):
        self.backend = backend
        self.config = config
        self.batcher = Batcher(
            backend, max_batch_size=effective_max_batch_size(config), max_wait_ms=config.max_wait_ms,
            max_queue=config.max_queue, order=PriorityOrder(config.priority.batch_aging),
        )
        self.cache = open_cache(config.cache, "audio")
        metrics.QUEUE_DEPTH.labels(queue=QUEUE).set_function(lambda: self.batcher.queue_depth)

    def _window_shape(self):
        """The backend's model window for long clips; None: it has none (Triton, test doubles)."""
        return getattr(self.backend, "window_shape", lambda: None)()

    def limits(self) -> audio_pb2.AudioLimits:
        """What this replica makes: its --max-clip-seconds (a backend without model windows makes one call's
        length at most), and whether it has the speech/music guard."""
        windows = self._window_shape() is not None
        longest = self.config.max_clip_seconds if windows else min(self.config.max_clip_seconds,
                                                                   contract.MAX_SINGLE_WINDOW_SECONDS)
        return audio_pb2.AudioLimits(max_clip_seconds=longest, speech_music_guard=clip_maker.can_guard(self.backend))

    async def GetAudioLimits(self, request: audio_pb2.GetAudioLimitsRequest, context: grpc.aio.ServicerContext):
        if not self.backend.ready:  # the window shape is the loaded model's
            raise NotReady("the audio model is still loading")
        return self.limits()

    async def GenerateAudio(self, request: audio_pb2.GenerateAudioRequest, context: grpc.aio.ServicerContext):
        if not self.backend.ready:
            raise NotReady("the audio model is still loading")
        call = contract.generate_audio(request.prompt, request.settings, request.clip_id,
                                       self.config.default_negative_prompt, request)
        generation, clip_id = call.generation, call.clip_id
        if generation.duration_seconds > self.config.max_clip_seconds:
            raise InvalidInput(f"settings: duration_seconds={generation.duration_seconds:g}; this service makes "
                               f"clips of at most {self.config.max_clip_seconds:g} s")
        made = clip_maker.needs_clip_maker(generation)  # long, looped or guarded: streamed as made
        key = clip_key(call, self.backend, self.config.speech_music_margin)
        cached = await self.cache.lookup(key, call.handling.bypass_cache)
        if cached is not None:  # no model runs: the clip as it was rendered, encoded as this call asks
            waveform, metadata = unpack_clip(cached)
            request_log.note(clip_id=clip_id, cache_hit=True)
            for response in (self._replayed if made else self._chunks)(call, waveform, metadata):
                yield response
            return
        if made:
            async for response in self._made(call, context, key):
                yield response
            return

        # Progress events while the batch denoises; the clip follows. If the caller cancels, this
        # coroutine is cancelled, the batcher marks the request and the backend stops early.
        started = time.perf_counter()
        async with Pump() as pump:

            def progress(done: int, total: int) -> None:
                pump.put_nowait(audio_pb2.GenerateAudioResponse(
                    progress=common_pb2.Progress(steps_done=done, steps_total=total)))

            async def render() -> None:
                pump.put_nowait(await self.batcher.submit(generation, on_step=progress,
                                                          deadline=Deadline.from_context(context),
                                                          priority=call.handling.priority))

            pump.spawn(render())
            async for item in pump:
                if isinstance(item, AudioResult):
                    result = item
                else:
                    yield item
        elapsed = time.perf_counter() - started
        out = await asyncio.to_thread(loudness.deliver, result.waveform, result.sample_rate_hertz,
                                      call.output.sample_rate_hertz, call.output.loudness_target_lufs)

        metadata = common_pb2.ClipMetadata(
            duration_seconds=len(out.samples) / out.rate,
            sample_rate_hertz=out.rate,
            num_samples=len(out.samples),
            seed=generation.seed,
            num_inference_steps=result.steps_run,
            scheduler=contract.SCHEDULER_ENUM[result.scheduler],
            guidance_scale=generation.guidance_scale,
            model_id=result.model_id,
            prompt=generation.prompt,
            negative_prompt=generation.negative_prompt,
            num_candidates=generation.num_candidates,
            generation_seconds=elapsed,
        )
        if result.score is not None:
            metadata.score = result.score
        loudness.record(metadata, out.level, out.gain_db)
        request_log.note(clip_id=clip_id, generation_seconds=elapsed, audio_seconds=metadata.duration_seconds,
                         steps=result.steps_run)
        await self.cache.store(key, pack_clip(out.samples, metadata))  # as sent: rate and loudness applied
        for response in self._chunks(call, out.samples, metadata):
            yield response

    @staticmethod
    def _chunks(call: contract.AudioCall, waveform, metadata: common_pb2.ClipMetadata):
        sending = tracing.request_phases("audio.chunk_send")
        for chunk in audio_encoding.audio_chunks(
            call.clip_id, waveform, metadata.sample_rate_hertz, call.output.encoding, call.output.chunk_seconds,
            metadata,
        ):
            yield audio_pb2.GenerateAudioResponse(chunk=chunk)
        sending.end()

    @staticmethod
    def _replayed(call: contract.AudioCall, waveform, metadata: common_pb2.ClipMetadata):
        """A cached long, looped or guarded clip, chunked as :meth:`_made` chunked it (a ChunkStream cuts at the
        same multiples of the chunk length however the samples arrive): the same bytes."""
        stream = ChunkStream(call.clip_id, metadata.sample_rate_hertz, call.output.encoding, call.output.chunk_seconds)
        for chunk in [*stream.add(waveform), *stream.finish(metadata)]:
            yield audio_pb2.GenerateAudioResponse(chunk=chunk)

    async def _made(self, call: contract.AudioCall, context: grpc.aio.ServicerContext, key: str | None):
        """A long, looped or guarded clip (audio_service/clip_maker.py): progress over all its model calls, its
        chunks as soon as its samples are final (a long clip's first window streams before the second is
        made), the metadata on the last chunk; then it is cached under `key` (None: not cached)."""
        generation = call.generation
        shape = self._window_shape()
        rate = shape.sample_rate_hertz if shape else self.backend.sample_rate_hertz
        deadline = Deadline.from_context(context)
        # A loudness target needs the whole clip (measured before its gain): sent at the end. Another rate
        # streams: the resampler gives, piece by piece, exactly the samples of resampling the clip whole.
        out_rate = call.output.sample_rate_hertz or rate
        whole = call.output.loudness_target_lufs is not None
        resampler = loudness.StreamResampler(rate, out_rate)
        stream = ChunkStream(call.clip_id, out_rate, call.output.encoding, call.output.chunk_seconds)
        made_samples: list[np.ndarray] = []  # kept when the clip goes out whole
        sent_samples: list[np.ndarray] = []  # as sent, when streamed
        started = time.perf_counter()
        async with Pump() as pump:

            def progress_from(offset: int):
                def progress(done: int, total: int) -> None:
                    pump.put_nowait(audio_pb2.GenerateAudioResponse(
                        progress=common_pb2.Progress(steps_done=offset + done, steps_total=offset + total)))
                return progress

            async def submit_window(request, window):
                steps = request.num_inference_steps
                return await self.batcher.submit(request, on_step=progress_from(window.index * steps),
                                                 deadline=deadline, priority=call.handling.priority, window=window)

            async def submit_clip(request):
                return await self.batcher.submit(request, on_step=progress_from(0), deadline=deadline,
                                                 priority=call.handling.priority)

            async def render() -> None:
                async for item in clip_maker.make_clip(
                        generation, sample_rate=rate, shape=shape, submit_clip=submit_clip,
                        submit_window=submit_window, backend=self.backend,
                        guard_margin=self.config.speech_music_margin):
                    pump.put_nowait(item)

            pump.spawn(render())
            async for item in pump:
                if isinstance(item, np.ndarray):
                    if whole:
                        made_samples.append(item)
                    else:
                        sent_samples.append(resampler.add(item))
                        for chunk in stream.add(sent_samples[-1]):
                            yield audio_pb2.GenerateAudioResponse(chunk=chunk)
                elif isinstance(item, clip_maker.MadeClip):
                    made = item
                else:
                    yield item
        elapsed = time.perf_counter() - started
        if whole:
            clip = np.concatenate(made_samples) if made_samples else np.zeros(0, np.float32)
            out = await asyncio.to_thread(loudness.deliver, clip, rate, out_rate, call.output.loudness_target_lufs)
            level, gain_db, sent = out.level, out.gain_db, out.samples
        else:
            sent_samples.append(resampler.finish())
            for chunk in stream.add(sent_samples[-1]):
                yield audio_pb2.GenerateAudioResponse(chunk=chunk)
            sent = np.concatenate(sent_samples)
            level, gain_db = await asyncio.to_thread(loudness.measure, sent, out_rate), 0.0
        scale = out_rate / rate  # sample offsets at the rate sent
        first = made.results[0]
        scores = [r.score for r in made.results if r.score is not None]
        metadata = common_pb2.ClipMetadata(
            duration_seconds=len(sent) / out_rate, sample_rate_hertz=out_rate, num_samples=len(sent),
            seed=made.seed, num_inference_steps=first.steps_run, scheduler=contract.SCHEDULER_ENUM[first.scheduler],
            guidance_scale=generation.guidance_scale, model_id=first.model_id, prompt=generation.prompt,
            negative_prompt=generation.negative_prompt, num_candidates=generation.num_candidates,
            generation_seconds=elapsed, window_count=made.windows,
            window_join_samples=[round(j * scale) for j in made.join_samples],
            guard_attempts=[common_pb2.GuardAttempt(**dataclasses.asdict(a)) for a in made.attempts],
        )
        if made.loop_points is not None:
            metadata.loop_start_sample = round(made.loop_points[0] * scale)
            metadata.loop_end_sample = made.loop_points[1] if out_rate == rate else metadata.num_samples
        if scores:
            metadata.score = float(np.mean(scores))  # each window's against the caption
        request_log.note(clip_id=call.clip_id, generation_seconds=elapsed, audio_seconds=metadata.duration_seconds,
                         steps=first.steps_run, windows=made.windows, tries=max(1, len(made.attempts)))
        loudness.record(metadata, level, gain_db)
        await self.cache.store(key, pack_clip(sent, metadata))
        if whole:
            for chunk in stream.add(sent):
                yield audio_pb2.GenerateAudioResponse(chunk=chunk)
        for chunk in stream.finish(metadata):
            yield audio_pb2.GenerateAudioResponse(chunk=chunk)

    async def close(self) -> None:
        await self.batcher.close()
        await self.cache.close()


def build_backend(config: AudioConfig) -> AudioBackend:
    """The one place that picks a backend implementation from the config."""
    if config.backend == "diffusers":
        from audio_service.diffusers_backend import DiffusersAudioBackend
        from serving.models import hf_token

        max_batch = effective_max_batch_size(config)
        return DiffusersAudioBackend(
            model=config.model, revision=config.revision, token=hf_token(), device=config.device, dtype=config.dtype,
            compile=config.compile, duration_buckets=effective_buckets(config),
            prompt_cache_size=config.prompt_cache_size,
            # Ready means warmed on the shapes requests use: compiled, every bucket at every batch size
            # (CUDA graphs record one graph per shape); eager kernels need no per-shape warm-up, only the
            # first call on the model thread (lazy initialisation), at the default clip length.
            warmup_batch_sizes=range(1, max_batch + 1) if config.compile != "none" else (1,),
            warmup_duration_seconds=contract.DEFAULT_DURATION_SECONDS, self_check=config.self_check,
        )
    if config.backend == "triton":  # the model runs in a Triton server (deploy/triton); --model is not used
        from audio_service.triton_backend import TritonAudioBackend

        return TritonAudioBackend(config.triton_url, config.triton_model, tls=config.triton_tls)
    raise ValueError(f"unknown audio backend {config.backend!r}")


def make_server(
    config: AudioConfig, backend: AudioBackend, interceptors: Sequence[grpc.aio.ServerInterceptor] = ()
) -> tuple[GrpcServer, AudioServicer]:
    servicer = AudioServicer(backend, config)
    server = GrpcServer(
        config.server, lambda s: audio_pb2_grpc.add_AudioServiceServicer_to_server(servicer, s), [SERVICE_NAME],
        interceptors,
    )
    return server, servicer


def load_and_warm(backend: AudioBackend) -> None:
    """Loads and warms; the in-process backend runs both on its own model thread, whoever calls this."""
    backend.load()
    backend.warmup()
    fast_path.report("audio", backend.serving_path, backend.serving_path_reason)
