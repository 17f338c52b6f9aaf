"""Orchestrator servicer: requests in, pipeline events out. The chaining itself is in pipeline.py."""
from __future__ import annotations

import asyncio
import logging
from typing import Sequence

import grpc

from image_to_sound.v1 import audio_pb2_grpc, orchestrator_pb2 as pb, orchestrator_pb2_grpc, vision_pb2_grpc
from i2s_formats import contract
from i2s_formats.contract import clean_request_id, with_defaults
from serving import channels
from orchestrator.admission import Admission, StreamShare
from orchestrator.audio_limits import AudioLimits
from orchestrator.config import OrchestratorConfig
from orchestrator.pipeline import Pipeline
from serving import metrics, request_log, security
from serving.deadline import Deadline
from serving.errors import InvalidInput
from serving.interceptors import client_status
from serving.priority import PriorityOrder
from serving.pump import Pump
from serving.server import GrpcServer

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Orchestrator"].full_name
RELOAD_CONNECT_SECONDS = 10.0  # how long new downstream channels may take to connect before they replace the old


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServicer):
    def __init__(self, pipeline: Pipeline, config: OrchestratorConfig):
        self.pipeline = pipeline
        self.config = config
        self.admission = Admission(total=config.max_images_total, max_waiting=config.max_images_waiting,
                                   wait_seconds=config.admission_wait_seconds,
                                   order=PriorityOrder(config.priority.batch_aging))
        metrics.QUEUE_DEPTH.labels(queue="orchestrator_admission").set_function(lambda: self.admission.waiting)
        self.audio_limits = AudioLimits()  # what the audio service makes (asked once it serves)

    def _resolve(self, request: pb.ImageToSoundRequest, context: grpc.aio.ServicerContext) -> contract.ImageRequest:
        header = dict(context.invocation_metadata() or ()).get(contract.PRIORITY_HEADER, "")
        resolved = contract.image_to_sound(request, self.config.limits.max_clips_per_image, priority_header=header)
        self.audio_limits.check(resolved)  # what every clip would fail at the audio service's edge
        return resolved

    def _deadline(self, context: grpc.aio.ServicerContext) -> Deadline:
        return Deadline.from_context(context, self.config.default_deadline_seconds)

    async def ImageToSound(self, request: pb.ImageToSoundRequest, context: grpc.aio.ServicerContext):
        deadline = self._deadline(context)
        request_log.set_request_id(request.request_id)  # as sent (cleaned), for the log line of a refusal
        resolved = self._resolve(request, context)  # before any wait or work: INVALID_ARGUMENT
        request_log.set_request_id(resolved.request_id)  # made when none was sent
        # RESOURCE_EXHAUSTED when no slot comes in time
        async with self.admission.slot(StreamShare(), resolved.handling.priority):
            async for event in self.pipeline.run(resolved, deadline):
                yield event

    async def StreamImagesToSound(self, request_iterator, context: grpc.aio.ServicerContext):
        """Images are read as they come and run concurrently (at most max_images_in_flight: the reader stops
        reading while that many run, so the client's stream is flow-controlled); their events are merged into
        one output stream. A failing image becomes an ImageFailed event."""
        slots = asyncio.Semaphore(self.config.max_images_in_flight)  # the stream's one concurrency limit

        share = StreamShare()
        clip_prefixes: dict[str, int] = {}  # request id -> images seen with it, so clip ids stay unique

        async def run_image(request: pb.ImageToSoundRequest) -> None:
            # The stream's deadline if the caller set one; else each image gets the default from its arrival
            # (a streaming app may keep one stream open far longer than any single image takes).
            deadline = self._deadline(context)
            request_id = request.request_id  # cleaned (or made) as the image was read
            try:
                with request_log.record("StreamImagesToSound.image", request_id):  # one log line per image
                    resolved = self._resolve(request, context)
                    seen = clip_prefixes[request_id] = clip_prefixes.get(request_id, 0) + 1
                    prefix = request_id if seen == 1 else f"{request_id}~{seen}"
                    async with self.admission.slot(share, resolved.handling.priority):
                        async for event in self.pipeline.run(resolved, deadline, clip_prefix=prefix):
                            await out.put(event)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - reported to the client as an event
                code, message = client_status(exc, "StreamImagesToSound image")
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
                    out.spawn(run_image(image))
                else:
                    raise InvalidInput("each message needs a config or an image")
                first = False

        # The stream ends when the reader and every image have ended; a reader's error (a bad message order)
        # ends it with that error; the caller leaving cancels them all.
        async with Pump(self.config.limits.event_queue_size) as out:
            out.spawn(read_requests())
            async for event in out:
                yield event


class Orchestrator:
    """The orchestrator service: channels to the model services, the pipeline and the gRPC server."""

    def __init__(self, config: OrchestratorConfig, interceptors: Sequence[grpc.aio.ServerInterceptor] = ()):
        self.config = config
        # Client TLS files are read into a channel's credentials once: when they change (a rotated Secret),
        # new channels replace the old ones (see reload_downstream_credentials).
        self._credentials = security.reloading_client_credentials(
            "downstream channels", config.downstream_tls_ca_file, config.downstream_tls_cert_file,
            config.downstream_tls_key_file)
        self._call_credentials = security.token_call_credentials(token_file=config.downstream_token_file)
        self.channels = self._open_channels()
        pipeline = Pipeline(None, None, config.limits, overloaded_retries=config.overloaded_retries)
        self._use_channels(pipeline)
        self.servicer = OrchestratorServicer(pipeline, config)
        self.server = GrpcServer(
            config.server, lambda s: orchestrator_pb2_grpc.add_OrchestratorServicer_to_server(self.servicer, s),
            [SERVICE_NAME],
            interceptors,
        )
        self._mirror: asyncio.Task | None = None
        self._tls_watcher: asyncio.Task | None = None
        self._limits_asker: asyncio.Task | None = None
        self._retired: list[grpc.aio.Channel] = []
        self._closing: set[asyncio.Task] = set()

    def _open_channels(self) -> dict[str, grpc.aio.Channel]:
        config, credentials = self.config, self._credentials.value
        # An empty target means "not deployed" (embedded --skip_vlm / --skip_audio runs).
        return {name: channels.aio_channel(target, credentials, self._call_credentials)
                for name, target in (("vlm", config.vlm_target), ("audio", config.audio_target)) if target}

    def _use_channels(self, pipeline: Pipeline) -> None:
        pipeline.vlm = vision_pb2_grpc.VisionServiceStub(self.channels["vlm"]) if "vlm" in self.channels else None
        pipeline.audio = audio_pb2_grpc.AudioServiceStub(self.channels["audio"]) if "audio" in self.channels else None

    async def reload_downstream_credentials(self) -> bool:
        """If the downstream TLS files changed: new channels for new calls; calls in flight finish on the
        old ones (closed after --channel-close-grace-seconds). Unusable files keep the current channels.
        Returns whether the channels were replaced."""
        if not self._credentials.refresh():  # unchanged, or unusable (then logged, and the current ones kept)
            return False
        fresh = self._open_channels()
        from serving.health import mirror_serving, wait_channel_serving

        try:  # new calls go to the new channels once they reach a serving backend (or after a bound)
            await asyncio.wait_for(asyncio.gather(*(wait_channel_serving(c) for c in fresh.values())),
                                   RELOAD_CONNECT_SECONDS)
            connected = True
        except asyncio.TimeoutError:
            connected = False
        old, self.channels = self.channels, fresh
        self._use_channels(self.servicer.pipeline)
        if self._mirror is not None:
            self._mirror.cancel()
            await asyncio.gather(self._mirror, return_exceptions=True)
            self._mirror = asyncio.create_task(mirror_serving(self.channels, self.server.set_serving))
            if connected:  # at once: clients that check health may call as soon as this returns
                await self.server.set_serving(True)
        for channel in old.values():
            self._retired.append(channel)
            task = asyncio.create_task(channel.close(grace=self.config.channel_close_grace_seconds))
            self._closing.add(task)
            task.add_done_callback(lambda t, c=channel: (self._closing.discard(t), self._retired.remove(c)))
        return True

    async def _watch_tls_files(self) -> None:
        while True:
            await asyncio.sleep(self.config.downstream_tls_check_seconds)  # polling files, not synchronising
            await self.reload_downstream_credentials()

    async def wait_for_backends(self, timeout: float | None = None) -> None:
        """Blocks until at least one backend of each model service serves, then keeps the orchestrator's own
        health in step: NOT_SERVING while no backend of a model service serves (all restarting, draining,
        gone); one draining replica among several leaves it SERVING."""
        from serving.health import mirror_serving, wait_channel_serving

        await asyncio.gather(*(wait_channel_serving(channel, timeout=timeout) for channel in self.channels.values()))
        self._mirror = asyncio.create_task(mirror_serving(self.channels, self.server.set_serving))
        pipeline, limits = self.servicer.pipeline, self.servicer.audio_limits
        if pipeline.audio is not None:
            await limits.ask(pipeline.audio)  # before this returns: the first request is checked
            if self.config.audio_limits_refresh_seconds > 0:
                self._limits_asker = asyncio.create_task(
                    limits.keep_asking(lambda: pipeline.audio, self.config.audio_limits_refresh_seconds))
        if self._credentials.watched.files and self.config.downstream_tls_check_seconds > 0:
            self._tls_watcher = asyncio.create_task(self._watch_tls_files())

    async def close(self) -> None:
        tasks = [t for t in (self._mirror, self._tls_watcher, self._limits_asker) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in [*self._retired, *self.channels.values()]:
            await channel.close()
        await asyncio.gather(*self._closing, return_exceptions=True)
