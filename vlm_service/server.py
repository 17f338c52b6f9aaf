"""VisionService servicer: gRPC messages in, backend calls, messages out. No model logic here."""
from __future__ import annotations

import logging
from typing import Sequence

import grpc

from image_to_sound.v1 import vision_pb2, vision_pb2_grpc
from serving import fast_path, metrics, request_log, tracing
from serving.blocking import ModelWorker
from serving.deadline import Deadline
from serving.errors import DeadlineExceeded, NotReady
from serving.server import GrpcServer
from i2s_formats import contract
from serving.result_cache import open_cache
from vlm_service.backend import DescriptionDone, SourceFound, VisionBackend
from vlm_service.config import VlmConfig, engine_options  # noqa: F401 - engine_options: bench's import
from vlm_service.description_cache import (STORED_REASONS, description_key, pack_events, replay, stats_message,
                                           stream_message)

log = logging.getLogger(__name__)
SERVICE_NAME = vision_pb2.DESCRIPTOR.services_by_name["VisionService"].full_name
QUEUE = "vlm"  # its i2s_queue_depth label: the waiting work the autoscalers read (deploy/README.md "Scaling")


class VisionServicer(vision_pb2_grpc.VisionServiceServicer):
    def __init__(self, backend: VisionBackend, config: VlmConfig):
        self.backend = backend
        self.config = config
        # One queue in front of the model: the backend's own scheduler's, else this worker's, whose threads
        # send the backend as many requests at once as it takes.
        self.worker = None if backend.concurrent_requests is None else ModelWorker(
            "vlm", max_queue=config.max_queue, concurrency=backend.concurrent_requests)
        queue = backend if self.worker is None else self.worker
        metrics.QUEUE_DEPTH.labels(queue=QUEUE).set_function(lambda: queue.queue_depth)
        self.cache = open_cache(config.cache, "vlm")

    async def _events(self, request, context):
        if not self.backend.ready:
            raise NotReady("the VLM is still loading")
        scene = contract.scene_request(request, self.config.image_limits)
        image, options = scene.image, scene.decoding
        key = description_key(request.image.data, options, self.backend)
        cached = await self.cache.lookup(key, scene.handling.bypass_cache)
        if cached is not None:  # no model runs: the stream as it was sent
            request_log.note(cache_hit=True)
            for event in replay(cached):
                yield event
            return
        deadline = Deadline.from_context(context)
        parent, started_ns, sources, sent = tracing.capture(), tracing.now_ns(), 0, []
        async for event in self.backend.astream(image, options, self.worker, deadline,
                                                priority=scene.handling.priority):
            if isinstance(event, SourceFound):
                sources += 1
                tracing.record_span(parent, "vlm.time_to_source", started_ns, source_index=sources,
                                    variants=len(event.source.variants))
            elif isinstance(event, DescriptionDone):
                metrics.MODEL_SECONDS.labels(stage="vlm").observe(event.total_seconds)
                metrics.VLM_TOKENS.labels(kind="prompt").inc(event.prompt_tokens)
                metrics.VLM_TOKENS.labels(kind="output").inc(event.output_tokens)
                request_log.note(prompt_tokens=event.prompt_tokens, output_tokens=event.output_tokens,
                                 time_to_first_token_s=event.time_to_first_token_seconds,
                                 model_seconds=event.total_seconds, finish_reason=event.finish_reason)
                if event.model_steps and context is not None:  # the bench reads model steps vs tokens here
                    context.set_trailing_metadata((("vlm-model-steps", str(event.model_steps)),))
                if event.finish_reason == "deadline":  # a cut description is not an answer
                    raise DeadlineExceeded(f"deadline exceeded after {event.output_tokens} tokens of the description")
                if event.finish_reason in STORED_REASONS:  # before the last yield: DescribeScene stops reading at it
                    await self.cache.store(key, pack_events([*sent, event]))
            sent.append(event)
            yield event

    async def DescribeScene(self, request: vision_pb2.DescribeSceneRequest, context: grpc.aio.ServicerContext):
        async for event in self._events(request, context):
            if isinstance(event, DescriptionDone):
                return vision_pb2.DescribeSceneResponse(description=event.description, stats=stats_message(event))
        raise RuntimeError("the backend ended without a description")

    async def StreamSceneDescription(self, request: vision_pb2.StreamSceneDescriptionRequest, context):
        async for event in self._events(request, context):
            yield stream_message(event)

    def close(self) -> None:  # the cache's connections (if any) end with the process
        if self.worker is not None:
            self.worker.close()


def build_backend(config: VlmConfig) -> VisionBackend:
    """The one place that picks a backend implementation from the config."""
    if config.backend == "transformers":
        from vlm_service.transformers_backend import TransformersVisionBackend

        return TransformersVisionBackend.from_config(config)
    if config.backend == "triton":  # the model runs in a Triton server (deploy/triton); --model is not used
        from vlm_service.triton_backend import TritonVisionBackend

        return TritonVisionBackend(config.triton_url, config.triton_model, prompt_version=config.prompt_version,
                                   tls=config.triton_tls, concurrent_requests=config.engine_max_batch)
    raise ValueError(f"unknown VLM backend {config.backend!r}")


def make_server(
    config: VlmConfig, backend: VisionBackend, interceptors: Sequence[grpc.aio.ServerInterceptor] = ()
) -> tuple[GrpcServer, VisionServicer]:
    servicer = VisionServicer(backend, config)
    server = GrpcServer(
        config.server,
        lambda s: vision_pb2_grpc.add_VisionServiceServicer_to_server(servicer, s),
        [SERVICE_NAME],
        interceptors,
    )
    return server, servicer


def load_and_warm(backend: VisionBackend) -> None:
    backend.load()
    backend.warmup()
    fast_path.report("vlm", backend.serving_path, backend.serving_path_reason)
