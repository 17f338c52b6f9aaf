"""VisionBackend that forwards to a Triton Inference Server hosting the VLM (deploy/triton/vlm).

The Triton model is decoupled: one request (the decoded RGB pixels and the decoding options) gets one
response per StreamEvent, as the model decodes, the last a DescriptionDone or an error. This module also holds the
wire format of those events, used by both ends (the model in deploy/triton imports it), so the two
cannot drift: every event is (EVENT_KIND, EVENT) where EVENT is a serialized protobuf.

tritonclient is imported lazily: building the backend, or the model importing the codec, costs nothing.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import queue
import threading
import time
from typing import TYPE_CHECKING, AsyncIterator, Callable, Iterator

import numpy as np
from PIL import Image

from image_to_sound.v1 import common_pb2, vision_pb2
from i2s_formats.source_merge import SourceMerge
from serving import tracing
from serving.deadline import DEFAULT_DEADLINE_SECONDS
from serving.errors import InvalidInput, NotReady
from serving.priority import BATCH, INTERACTIVE, PRIORITIES
from serving.triton_client import (Readiness, TritonClients, TritonTls, call_timeout, model_ready,
                                   translate_error, wait_model_ready)
from vlm_service.backend import (DecodingOptions, DescriptionDone, SceneHeader, SourceFound,
                                 StreamEvent, VisionBackend)

if TYPE_CHECKING:
    from serving.blocking import ModelWorker
    from serving.deadline import Deadline

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "vlm"
# Tensor names of deploy/triton/vlm/config.pbtxt.
IMAGE, MAX_NEW_TOKENS, TEMPERATURE, TOP_P, SEED = "IMAGE", "MAX_NEW_TOKENS", "TEMPERATURE", "TOP_P", "SEED"
LOCATE_SOURCES = "LOCATE_SOURCES"  # optional; sent only when true, so older models take every other request
PRIORITY = "PRIORITY"  # optional; sent only for batch work (serving.priority), likewise
EVENT_KIND, EVENT = "EVENT_KIND", "EVENT"
HEADER, SOURCE, DONE, ERROR = b"header", b"source", b"done", b"error"
# How often a waiting stream looks at should_stop.
_STOP_POLL_SECONDS = 0.05


# -- wire format (both ends) ------------------------------------------------------------------------

def encode_event(event: StreamEvent) -> tuple[bytes, bytes]:
    if isinstance(event, SceneHeader):
        return HEADER, vision_pb2.SceneSummary(scene=event.scene, mood=event.mood).SerializeToString()
    if isinstance(event, SourceFound):
        return SOURCE, event.source.SerializeToString()
    if isinstance(event, DescriptionDone):
        final = vision_pb2.DescribeSceneResponse(
            description=event.description,
            stats=common_pb2.DescriptionStats(
                prompt_tokens=event.prompt_tokens, output_tokens=event.output_tokens,
                time_to_first_token_seconds=event.time_to_first_token_seconds, total_seconds=event.total_seconds,
            ),
        )
        # finish_reason has no protobuf field: it rides in the kind ("done:stop", "done:length", ...).
        return DONE + b":" + event.finish_reason.encode(), final.SerializeToString()
    raise TypeError(f"not a stream event: {event!r}")


def encode_error(exc: BaseException) -> tuple[bytes, bytes]:
    """An error the client must re-raise as the same domain exception (Triton's stream errors carry no code)."""
    kind = "bad_image" if isinstance(exc, InvalidInput) else "invalid" if isinstance(exc, ValueError) else (
        "not_ready" if isinstance(exc, NotReady) else "internal")
    return ERROR, json.dumps({"kind": kind, "message": str(exc)}).encode()


def decode_event(kind: bytes, payload: bytes) -> StreamEvent:
    if kind == HEADER:
        summary = vision_pb2.SceneSummary.FromString(payload)
        return SceneHeader(scene=summary.scene, mood=summary.mood)
    if kind == SOURCE:
        return SourceFound(common_pb2.SoundSource.FromString(payload))
    if kind.startswith(DONE + b":"):
        final = vision_pb2.DescribeSceneResponse.FromString(payload)
        return DescriptionDone(
            description=final.description, prompt_tokens=final.stats.prompt_tokens,
            output_tokens=final.stats.output_tokens,
            time_to_first_token_seconds=final.stats.time_to_first_token_seconds,
            total_seconds=final.stats.total_seconds, finish_reason=kind[len(DONE) + 1:].decode(),
        )
    if kind == ERROR:
        error = json.loads(payload)
        exc_type = {"bad_image": InvalidInput, "invalid": ValueError, "not_ready": NotReady}.get(error["kind"])
        raise (exc_type or RuntimeError)(error["message"])
    raise RuntimeError(f"unknown event kind {kind!r} from Triton")


def request_arrays(image: Image.Image, options: DecodingOptions, priority: str = INTERACTIVE) -> dict[str, np.ndarray]:
    """The model's inputs: raw RGB pixels (the service has decoded and size-checked the image already, so
    nothing is re-encoded), the options and the priority; SEED is optional and left out when None."""
    arrays = {
        IMAGE: np.asarray(image.convert("RGB"), dtype=np.uint8),
        MAX_NEW_TOKENS: np.array([options.max_new_tokens], dtype=np.int32),
        TEMPERATURE: np.array([options.temperature], dtype=np.float32),
        TOP_P: np.array([options.top_p], dtype=np.float32),
    }
    if options.seed is not None:
        arrays[SEED] = np.array([options.seed], dtype=np.int64)
    if options.locate_sources:
        arrays[LOCATE_SOURCES] = np.array([True], dtype=np.bool_)
    if priority == BATCH:
        arrays[PRIORITY] = np.array([priority.encode()], dtype=np.object_)
    return arrays


def priority_from_arrays(arrays: dict[str, np.ndarray | None]) -> str:
    """The request's priority: interactive unless PRIORITY says otherwise (ValueError for an unknown one)."""
    sent = arrays.get(PRIORITY)
    if sent is None:
        return INTERACTIVE
    value = sent.reshape(-1)[0]
    value = value.decode() if isinstance(value, bytes) else str(value)
    if value not in PRIORITIES:
        raise ValueError(f"PRIORITY={value!r}; one of {', '.join(PRIORITIES)}")
    return value


def options_from_arrays(arrays: dict[str, np.ndarray | None]) -> DecodingOptions:
    seed, locate = arrays.get(SEED), arrays.get(LOCATE_SOURCES)
    return DecodingOptions(
        max_new_tokens=int(arrays[MAX_NEW_TOKENS].reshape(-1)[0]),
        temperature=float(arrays[TEMPERATURE].reshape(-1)[0]),
        top_p=float(arrays[TOP_P].reshape(-1)[0]),
        seed=None if seed is None else int(seed.reshape(-1)[0]),
        locate_sources=bool(locate is not None and locate.reshape(-1)[0]),
    )


# -- the client side --------------------------------------------------------------------------------

class TritonVisionBackend(VisionBackend):
    """Describes images through Triton's gRPC streaming API; events arrive as the model decodes them.

    The service sends it `concurrent_requests` streams at once (one worker thread each): Triton's model
    decodes the requests in flight together, so this is the model's `engine_max_batch`."""

    def __init__(self, url: str, model_name: str = DEFAULT_MODEL_NAME, *, prompt_version: str = "v1",
                 load_timeout_seconds: float = 1800.0, request_timeout_seconds: float | None = DEFAULT_DEADLINE_SECONDS,
                 readiness_ttl_seconds: float = 1.0, tls: TritonTls | None = None, concurrent_requests: int = 8):
        self.url = url
        self.tls = tls or TritonTls()
        self.model_name = model_name
        self.model_id = f"triton:{model_name}"  # the checkpoint is the Triton model's business
        self.prompt_version = prompt_version
        self.load_timeout_seconds = load_timeout_seconds
        self.request_timeout_seconds = request_timeout_seconds
        self.concurrent_requests = concurrent_requests
        # Readiness calls share a client; each stream opens its own on the backend's event loop. Both follow
        # rotated TLS files.
        self._clients = TritonClients(url, self.tls, "VLM service -> Triton")
        self._io: _EventLoopThread | None = None
        self._loaded = self._warm = self._closed = False
        self._readiness = Readiness(readiness_ttl_seconds)

    def load(self) -> None:
        """Waits (bounded) until Triton says the model is ready: Triton loads it, not us."""
        wait_model_ready(self._clients.shared(), self.model_name, self.load_timeout_seconds)
        self._io = _EventLoopThread("triton-vlm-io")
        self._loaded = True

    @property
    def ready(self) -> bool:
        """Follows Triton's model readiness (a cheap gRPC call): an unloaded or failed model reads False."""
        if not (self._loaded and self._warm and not self._closed):
            return False
        return self._readiness.check(lambda: model_ready(self._clients.shared(), self.model_name))

    def warmup(self) -> None:
        """One short generation end to end, so the first request finds channel and model warm."""
        for _ in self.stream(Image.new("RGB", (56, 56), (128, 128, 128)), DecodingOptions(max_new_tokens=8)):
            pass
        self._warm = True

    def stream(self, image: Image.Image, options: DecodingOptions,
               should_stop: Callable[[], bool] | None = None, *,
               deadline: "Deadline | None" = None, priority: str = INTERACTIVE,
               phases: tracing.Phases = tracing.NO_PHASES) -> Iterator[StreamEvent]:
        """The events as Triton sends them; the time left to `deadline` (else `request_timeout_seconds`)
        is the stream's timeout, so Triton itself stops there (TimeoutError). The model's decode engine
        admits batch work after interactive work, as the in-process one does."""
        if not self._loaded or self._closed:
            raise NotReady("the Triton VLM backend is not loaded")
        return self._stream(request_arrays(image, options, priority), should_stop,
                            call_timeout(deadline, self.request_timeout_seconds), phases)

    async def astream(self, image: Image.Image, options: DecodingOptions, worker: "ModelWorker",
                      deadline: "Deadline | None" = None, priority: str = INTERACTIVE) -> AsyncIterator[StreamEvent]:
        # The in-process stages as seen from here: waiting for a model thread, then until Triton's first
        # event (its queue and the prefill), then the decoding.
        phases = tracing.request_phases("vlm.queue_wait", backend="triton")
        async for event in worker.stream(lambda should_stop: self.stream(
                image, options, should_stop, deadline=deadline, priority=priority, phases=phases)):
            yield event

    def _stream(self, arrays: dict[str, np.ndarray], should_stop: Callable[[], bool] | None,
                timeout_seconds: float | None, phases: tracing.Phases = tracing.NO_PHASES) -> Iterator[StreamEvent]:
        """The events `_pump` receives on the backend's event loop, handed over through a queue, so this
        thread can look at `should_stop` while it waits (the gRPC call cannot be told to look)."""
        phases.enter("vlm.prefill")
        started = time.perf_counter()
        items: queue.SimpleQueue = queue.SimpleQueue()
        pumping = self._io.submit(self._pump(arrays, timeout_seconds, items.put))
        pumping.add_done_callback(items.put)  # its end (an error, or after the last event) comes last
        decoding = False
        header: SceneHeader | None = None
        sources = SourceMerge()
        try:
            while not (should_stop is not None and should_stop()):
                try:
                    event = items.get(timeout=_STOP_POLL_SECONDS)
                except queue.Empty:
                    continue
                if event is pumping:
                    pumping.result()  # the pump's error
                    raise RuntimeError("Triton ended the stream without a description")
                if not decoding:  # the first event: the prompt is read, decoding goes on
                    decoding = True
                    phases.enter("vlm.decode")
                if isinstance(event, SceneHeader):
                    header = event
                elif isinstance(event, SourceFound):
                    sources.add(event.source)
                yield event
                if isinstance(event, DescriptionDone):
                    return
            # should_stop: the stream ends like the in-process one, with what was decoded so far.
            yield DescriptionDone(
                description=common_pb2.SceneDescription(
                    scene=header.scene if header else "", mood=header.mood if header else "",
                    sources=sources.sources(),
                ),
                prompt_tokens=0, output_tokens=0, time_to_first_token_seconds=0.0,
                total_seconds=time.perf_counter() - started, finish_reason="cancelled",
            )
        finally:
            pumping.cancel()  # stopped or left early: the call is cancelled, so Triton stops generating
            phases.end()

    async def _pump(self, arrays: dict[str, np.ndarray], timeout_seconds: float | None,
                    put: Callable[[StreamEvent], None]) -> None:
        """One decoupled request on a stream of its own (on the backend's event loop): puts its events until
        the DescriptionDone the model always ends with, or raises the error it ends with instead."""
        import grpc
        import tritonclient.grpc.aio as triton
        from tritonclient.utils import np_to_triton_dtype

        client = self._clients.new_aio()
        inputs = []
        for name, array in arrays.items():
            tensor = triton.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        outputs = [triton.InferRequestedOutput(EVENT_KIND), triton.InferRequestedOutput(EVENT)]

        async def one_request():  # the request side ends after it: no sender is left waiting when we leave
            yield {"model_name": self.model_name, "inputs": inputs, "outputs": outputs}

        call = client.stream_infer(one_request(), stream_timeout=timeout_seconds)
        try:
            async for result, error in call:
                if error is not None:
                    raise translate_error(error)
                event = decode_event(result.as_numpy(EVENT_KIND).reshape(-1)[0], result.as_numpy(EVENT).reshape(-1)[0])
                put(event)
                if isinstance(event, DescriptionDone):
                    return
        except grpc.RpcError as exc:  # the call's own end: its deadline, Triton gone
            raise translate_error(exc) from None
        finally:
            call.cancel()  # a no-op once the call has ended
            await client.close()

    def close(self) -> None:
        self._closed = True
        if self._io is not None:
            self._io.close()
            self._io = None
        self._clients.close()


class _EventLoopThread:
    """An event loop on a thread of its own, for the backend's gRPC aio calls: an aio call belongs to the
    loop it started on (a loop per stream, closed after it, leaves gRPC's poller calling a closed loop),
    and the service's threads only wait for it."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def submit(self, coroutine) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def close(self) -> None:
        """Cancels the calls still running (each closes its channel), then ends the loop and its thread."""
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.submit(cancel_all()).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()
