"""Orchestrator servicer: requests in, pipeline events out. The chaining itself is in pipeline.py."""
from __future__ import annotations

import asyncio
import logging
from typing import Sequence

import grpc

from image_to_sound.v1 import audio_pb2_grpc, orchestrator_pb2 as pb, orchestrator_pb2_grpc, vision_pb2_grpc
from serving import channels
from orchestrator.admission import Admission, StreamShare
from orchestrator.config import OrchestratorConfig
from orchestrator.pipeline import Deadline, Pipeline
from orchestrator.validation import clean_request_id, validate_request
from serving.errors import InvalidInput, excerpt, status_for
from serving.server import GrpcServer

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Orchestrator"].full_name
_END = object()


def with_defaults(image: pb.ImageToSoundRequest, config: pb.StreamConfig) -> pb.ImageToSoundRequest:
    """The stream's config under the image's own settings (fields the image sets win)."""
    merged = pb.ImageToSoundRequest()
    merged.decoding.CopyFrom(config.decoding)
    merged.audio.CopyFrom(config.audio)
    merged.options.CopyFrom(config.options)
    merged.MergeFrom(image)
    return merged


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServicer):
    def __init__(self, pipeline: Pipeline, config: OrchestratorConfig):
        self.pipeline = pipeline
        self.config = config
        self.admission = Admission(total=config.max_images_total, per_stream=config.max_images_in_flight,
                                   max_waiting=config.max_images_waiting, wait_seconds=config.admission_wait_seconds)

    def _validate(self, request: pb.ImageToSoundRequest) -> pb.ImageToSoundRequest:
        return validate_request(request, self.config.limits.max_clips_per_image)

    def _deadline(self, context: grpc.aio.ServicerContext) -> Deadline:
        left = context.time_remaining()
        return Deadline(left if left is not None else self.config.default_deadline_seconds)

    async def ImageToSound(self, request: pb.ImageToSoundRequest, context: grpc.aio.ServicerContext):
        deadline = self._deadline(context)
        request = self._validate(request)  # before any wait or work: INVALID_ARGUMENT
        async with self.admission.slot(StreamShare()):  # RESOURCE_EXHAUSTED when no slot comes in time
            async for event in self.pipeline.run(request, deadline):
                yield event

    async def StreamImagesToSound(self, request_iterator, context: grpc.aio.ServicerContext):
        """Images are read as they come and run concurrently (at most max_images_in_flight); their events
        are merged into one output stream. A failing image becomes an ImageFailed event."""
        out: asyncio.Queue = asyncio.Queue(maxsize=self.config.limits.event_queue_size)
        slots = asyncio.Semaphore(self.config.max_images_in_flight)
        tasks: set[asyncio.Task] = set()

        share = StreamShare()
        clip_prefixes: dict[str, int] = {}  # request id -> images seen with it, so clip ids stay unique

        async def run_image(request: pb.ImageToSoundRequest) -> None:
            # The stream's deadline if the caller set one; else each image gets the default from its arrival
            # (a streaming app may keep one stream open far longer than any single image takes).
            deadline = self._deadline(context)
            request_id = clean_request_id(request.request_id)
            try:
                request = self._validate(request)
                seen = clip_prefixes[request_id] = clip_prefixes.get(request_id, 0) + 1
                prefix = request_id if seen == 1 else f"{request_id}~{seen}"
                async with self.admission.slot(share):
                    async for event in self.pipeline.run(request, deadline, clip_prefix=prefix):
                        await out.put(event)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - reported to the client as an event
                code, message = status_for(exc)
                if code == grpc.StatusCode.INTERNAL:
                    log.error("image %s failed", excerpt(request_id), exc_info=exc)
                await out.put(pb.ImageToSoundEvent(
                    request_id=request_id, image_failed=pb.ImageFailed(code=code.value[0], message=message)))
            finally:
                slots.release()

        async def read_requests() -> None:
            config = pb.StreamConfig()
            first = True
            async for message in request_iterator:
                kind = message.WhichOneof("message")
                if kind == "config":
                    if not first:
                        raise InvalidInput("config must be the first message of the stream")
                    config = message.config
                elif kind == "image":
                    image = with_defaults(message.image, config)
                    image.request_id = clean_request_id(image.request_id)
                    await slots.acquire()  # backpressure: stop reading while enough images run
                    task = asyncio.create_task(run_image(image))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                else:
                    raise InvalidInput("each message needs a config or an image")
                first = False
            await asyncio.gather(*list(tasks))
            await out.put(_END)

        reader = asyncio.create_task(read_requests())
        try:
            while True:
                getter = asyncio.ensure_future(out.get())
                await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    reader.result()  # the reader failed: raise its error
                    continue
                item = getter.result()
                if item is _END:
                    break
                yield item
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(reader, *list(tasks), return_exceptions=True)


class Orchestrator:
    """The orchestrator service: channels to the model services, the pipeline and the gRPC server."""

    def __init__(self, config: OrchestratorConfig, interceptors: Sequence[grpc.aio.ServerInterceptor] = ()):
        self.config = config
        # An empty target means "not deployed" (embedded --skip_vlm / --skip_audio runs).
        self.channels = {name: channels.aio_channel(target)
                         for name, target in (("vlm", config.vlm_target), ("audio", config.audio_target)) if target}
        pipeline = Pipeline(
            vision_pb2_grpc.VisionServiceStub(self.channels["vlm"]) if "vlm" in self.channels else None,
            audio_pb2_grpc.AudioServiceStub(self.channels["audio"]) if "audio" in self.channels else None,
            config.limits,
            overloaded_retries=config.overloaded_retries,
        )
        self.servicer = OrchestratorServicer(pipeline, config)
        self.server = GrpcServer(
            config.server, lambda s: orchestrator_pb2_grpc.add_OrchestratorServicer_to_server(self.servicer, s),
            [SERVICE_NAME],
            interceptors,
        )
        self._mirror: asyncio.Task | None = None

    async def wait_for_backends(self, timeout: float | None = None) -> None:
        """Blocks until the model services answer health SERVING, then keeps the orchestrator's own health
        in step with theirs: NOT_SERVING while any of them is not (restarting, overloaded, gone)."""
        from serving.health import mirror_serving, wait_serving

        await asyncio.gather(*(wait_serving(channel, timeout=timeout) for channel in self.channels.values()))
        self._mirror = asyncio.create_task(mirror_serving(self.channels, self.server.set_serving))

    async def close(self) -> None:
        if self._mirror is not None:
            self._mirror.cancel()
            await asyncio.gather(self._mirror, return_exceptions=True)
        for channel in self.channels.values():
            await channel.close()
