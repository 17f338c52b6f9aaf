"""AudioService servicer: gRPC messages in, batched backend calls, audio chunks out. No model logic here."""
from __future__ import annotations

import logging
import time
from typing import Sequence

import grpc

from audio_service.backend import AudioBackend, AudioResult
from audio_service.batching import Batcher
from audio_service.config import AudioConfig, effective_buckets, effective_max_batch_size
from image_to_sound.v1 import audio_pb2, audio_pb2_grpc, common_pb2
from i2s_formats import audio_encoding, contract
from serving import fast_path, metrics, request_log, tracing
from serving.deadline import Deadline
from serving.errors import NotReady
from serving.pump import Pump
from serving.server import GrpcServer

log = logging.getLogger(__name__)
SERVICE_NAME = audio_pb2.DESCRIPTOR.services_by_name["AudioService"].full_name

class AudioServicer(audio_pb2_grpc.AudioServiceServicer):
    def __init__(self, backend: AudioBackend, config: AudioConfig):
        self.backend = backend
        self.config = config
        self.batcher = Batcher(
            backend, max_batch_size=effective_max_batch_size(config), max_wait_ms=config.max_wait_ms, max_queue=config.max_queue
        )
        metrics.QUEUE_DEPTH.labels(queue="audio_batch").set_function(lambda: self.batcher.queue_depth)

    async def GenerateAudio(self, request: audio_pb2.GenerateAudioRequest, context: grpc.aio.ServicerContext):
        if not self.backend.ready:
            raise NotReady("the audio model is still loading")
        call = contract.generate_audio(request.prompt, request.settings, request.clip_id,
                                       self.config.default_negative_prompt)
        generation, clip_id = call.generation, call.clip_id

        # Progress events while the batch denoises; the clip follows. If the caller cancels, this
        # coroutine is cancelled, the batcher marks the request and the backend stops early.
        started = time.perf_counter()
        async with Pump() as pump:

            def progress(done: int, total: int) -> None:
                pump.put_nowait(audio_pb2.GenerateAudioResponse(
                    progress=common_pb2.Progress(steps_done=done, steps_total=total)))

            async def render() -> None:
                pump.put_nowait(await self.batcher.submit(generation, on_step=progress,
                                                          deadline=Deadline.from_context(context)))

            pump.spawn(render())
            async for item in pump:
                if isinstance(item, AudioResult):
                    result = item
                else:
                    yield item
        elapsed = time.perf_counter() - started

        metadata = common_pb2.ClipMetadata(
            duration_seconds=len(result.waveform) / result.sample_rate_hertz,
            sample_rate_hertz=result.sample_rate_hertz,
            num_samples=len(result.waveform),
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
        request_log.note(clip_id=clip_id, generation_seconds=elapsed, audio_seconds=metadata.duration_seconds,
                         steps=result.steps_run)
        sending = tracing.request_phases("audio.chunk_send")
        for chunk in audio_encoding.audio_chunks(
            clip_id, result.waveform, result.sample_rate_hertz, call.output.encoding, call.output.chunk_seconds, metadata
        ):
            yield audio_pb2.GenerateAudioResponse(chunk=chunk)
        sending.end()

    async def close(self) -> None:
        await self.batcher.close()


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
