"""VisionService servicer: gRPC messages in, backend calls, messages out. No model logic here."""
from __future__ import annotations

import logging
from typing import Sequence

import grpc

from image_to_sound.v1 import common_pb2, vision_pb2, vision_pb2_grpc
from serving import fast_path, metrics, request_log, tracing
from serving.blocking import ModelWorker
from serving.deadline import Deadline
from serving.errors import DeadlineExceeded, NotReady
from serving.server import GrpcServer
from i2s_formats import contract
from vlm_service.backend import DescriptionDone, SceneHeader, SourceFound, VisionBackend
from vlm_service.config import VlmConfig

log = logging.getLogger(__name__)
SERVICE_NAME = vision_pb2.DESCRIPTOR.services_by_name["VisionService"].full_name


def stats_message(done: DescriptionDone) -> common_pb2.DescriptionStats:
    return common_pb2.DescriptionStats(
        prompt_tokens=done.prompt_tokens,
        output_tokens=done.output_tokens,
        time_to_first_token_seconds=done.time_to_first_token_seconds,
        total_seconds=done.total_seconds,
    )


class VisionServicer(vision_pb2_grpc.VisionServiceServicer):
    def __init__(self, backend: VisionBackend, config: VlmConfig):
        self.backend = backend
        self.config = config
        # One queue in front of the model: the backend's own scheduler's, else this worker's.
        self.worker = None if backend.schedules_itself else ModelWorker("vlm", max_queue=config.max_queue)
        metrics.QUEUE_DEPTH.labels(queue="vlm").set_function(lambda: getattr(backend, "queue_depth", 0))

    async def _events(self, request, context):
        if not self.backend.ready:
            raise NotReady("the VLM is still loading")
        scene = contract.scene_request(request, self.config.image_limits)
        image, options = scene.image, scene.decoding
        deadline = Deadline.from_context(context)
        parent, started_ns, sources = tracing.capture(), tracing.now_ns(), 0
        async for event in self.backend.astream(image, options, self.worker, deadline):
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
            yield event

    async def DescribeScene(self, request: vision_pb2.DescribeSceneRequest, context: grpc.aio.ServicerContext):
        async for event in self._events(request, context):
            if isinstance(event, DescriptionDone):
                return vision_pb2.DescribeSceneResponse(description=event.description, stats=stats_message(event))
        raise RuntimeError("the backend ended without a description")

    async def StreamSceneDescription(self, request: vision_pb2.StreamSceneDescriptionRequest, context):
        async for event in self._events(request, context):
            if isinstance(event, SceneHeader):
                yield vision_pb2.StreamSceneDescriptionResponse(
                    scene=vision_pb2.SceneSummary(scene=event.scene, mood=event.mood)
                )
            elif isinstance(event, SourceFound):
                yield vision_pb2.StreamSceneDescriptionResponse(source=event.source)
            elif isinstance(event, DescriptionDone):
                yield vision_pb2.StreamSceneDescriptionResponse(
                    final=vision_pb2.DescribeSceneResponse(description=event.description, stats=stats_message(event))
                )

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()


def build_backend(config: VlmConfig) -> VisionBackend:
    """The one place that picks a backend implementation from the config."""
    if config.backend == "transformers":
        from serving.models import hf_token
        from vlm_service.transformers_backend import TransformersVisionBackend

        kwargs = dict(model=config.model, revision=config.revision, token=hf_token(), device=config.device,
                      dtype=config.dtype, prompt_version=config.prompt_version, max_queue=config.max_queue,
                      engine=engine_options(config), sdpa_backend=config.sdpa_backend,
                      random_weights=config.random_weights)
        if config.max_pixels:
            kwargs["max_pixels"] = config.max_pixels
        return TransformersVisionBackend(**kwargs)
    if config.backend == "triton":  # the model runs in a Triton server (deploy/triton); --model is not used
        from vlm_service.triton_backend import TritonVisionBackend

        return TritonVisionBackend(config.triton_url, config.triton_model, prompt_version=config.prompt_version,
                                   tls=config.triton_tls)
    raise ValueError(f"unknown VLM backend {config.backend!r}")


def engine_options(config: VlmConfig):
    """The decode engine's options from the service flags (None: the reference generate() path)."""
    if not config.engine:
        return None
    from vlm_service.engine import EngineOptions

    batch_buckets = tuple(sorted({min(2**i, config.engine_max_batch) for i in range(config.engine_max_batch.bit_length() + 1)}))
    return EngineOptions(
        max_batch=config.engine_max_batch, batch_buckets=batch_buckets,
        token_buckets=config.engine_token_buckets,
        length_buckets=tuple(sorted({config.engine_max_len // 2, config.engine_max_len})),
        capture=config.engine_capture, jump_forward=config.engine_jump_forward,
        prefix_cache=config.engine_prefix_cache, attention=config.engine_attention,
        prefill_chunk=config.engine_prefill_chunk, self_check=config.self_check)


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
