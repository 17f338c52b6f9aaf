"""Python clients of the orchestrator, for Phase 2 and other callers.

    from i2s_client import ImageToSoundClient
    with ImageToSoundClient("localhost:50050") as client:
        client.wait_for_ready(timeout=600)  # the services may still be loading their models
        result = client.generate("data/street.jpg", duration_seconds=4, seed=7)  # priority="interactive"
    if not result.ok:
        print("failed:", result.error or [f.message for f in result.failed])
    for clip in result.clips:
        print(clip.file_name, clip.source_name, clip.action, clip.instrument_role, clip.waveform.shape)

`priority="batch"` marks throughput work (a folder, a dataset): it then waits behind interactive calls at
every stage (never starved); `bypass_cache=True` renders afresh even when the services hold the result.

One persistent channel per client (reuse it), a deadline on every call, retries on UNAVAILABLE
(see serving/channels.py), and helpers that turn the event stream into numpy arrays or WAV files.

Against a server with TLS and tokens (README "Security"):
    ImageToSoundClient("orchestrator.example:50050", tls_ca_file="ca.pem", token_file="token")
and for mutual TLS also tls_cert_file= and tls_key_file= (the client's certificate and key).
"""
from __future__ import annotations

import asyncio
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterable, AsyncIterator, Iterable, Iterator

import grpc
import numpy as np


from i2s_formats import audio_encoding, contract
from i2s_formats.audio_encoding import write_wav
from i2s_formats.seed_format import role_name
from i2s_formats.source_merge import SourceMerge
from image_to_sound.v1 import common_pb2, orchestrator_pb2 as pb, orchestrator_pb2_grpc
from serving import channels, security
from serving.deadline import DEFAULT_DEADLINE_SECONDS
from serving.images import mime_type_for

ImageInput = str | os.PathLike | bytes | common_pb2.Image
DEFAULT_TIMEOUT_SECONDS = DEFAULT_DEADLINE_SECONDS


def to_image(image: ImageInput) -> common_pb2.Image:
    """A path, raw bytes or an Image message → Image message (MIME type from the extension)."""
    if isinstance(image, common_pb2.Image):
        return image
    if isinstance(image, bytes):
        return common_pb2.Image(data=image)
    path = Path(image)
    return common_pb2.Image(data=path.read_bytes(), mime_type=mime_type_for(path.name))


def make_request(
    image: ImageInput | None = None,
    *,
    description: common_pb2.SceneDescription | None = None,
    request_id: str | None = None,
    audio: common_pb2.AudioSettings | None = None,
    decoding: common_pb2.DecodingSettings | None = None,
    options: pb.PipelineOptions | None = None,
    priority: str | None = None,
    bypass_cache: bool = False,
    **audio_settings,
) -> pb.ImageToSoundRequest:
    """Builds a request; keyword arguments are AudioSettings fields (duration_seconds=4, seed=7, ...).
    `priority`: "interactive" (the server's default) or "batch"; `bypass_cache`: skip the result caches."""
    request = pb.ImageToSoundRequest(request_id=request_id or uuid.uuid4().hex[:12])
    if description is not None:
        request.description.CopyFrom(description)
    elif image is not None:
        request.image.CopyFrom(to_image(image))
    else:
        raise ValueError("give an image or a description")
    if audio is not None:
        request.audio.CopyFrom(audio)
    if audio_settings:
        request.audio.MergeFrom(common_pb2.AudioSettings(**audio_settings))
    if decoding is not None:
        request.decoding.CopyFrom(decoding)
    if options is not None:
        request.options.CopyFrom(options)
    if priority is not None:
        request.options.priority = priority_enum(priority)
    if bypass_cache:
        request.options.bypass_cache = True
    return request


def priority_enum(priority: str) -> int:
    """"interactive" or "batch" -> the wire's Priority; ValueError for anything else."""
    try:
        return contract.PRIORITY_ENUM[priority]
    except KeyError:
        raise ValueError(f"priority={priority!r}: use one of {', '.join(contract.PRIORITY_ENUM)}") from None


@dataclass
class Clip:
    """One finished clip of an image, with what Phase 2 needs to route it."""

    ref: pb.ClipRef
    prompt: str = ""
    metadata: common_pb2.ClipMetadata | None = None
    sample_rate_hertz: int = 16000
    channels: int = 1  # 2 for the stereo scene mix
    payloads: list[bytes] = field(default_factory=list)
    encoding: int = common_pb2.AUDIO_ENCODING_PCM_S16LE
    source_name: str = ""
    action: str = ""
    instrument_role: str = "None"
    variant: common_pb2.SoundVariant | None = None  # what the clip renders (None for a scene mix)
    location: common_pb2.BoundingBox | None = None  # where its source is in the image, when known
    mix: pb.SceneMix | None = None  # how a scene mix was made (None for a variant clip)
    done: bool = False

    @property
    def file_name(self) -> str:
        return self.ref.file_name

    @property
    def waveform(self) -> np.ndarray:
        """The clip as float32 samples in [-1, 1]: (frames,) mono, (frames, 2) stereo."""
        return audio_encoding.decode_payloads(self.payloads, self.encoding, self.channels)

    @property
    def loop_points(self) -> tuple[int, int] | None:
        """[start, end) sample offsets of a loop clip (written into the WAV's sampler chunk); else None."""
        m = self.metadata
        if m is None or not m.HasField("loop_end_sample"):
            return None
        return int(m.loop_start_sample), int(m.loop_end_sample)

    def save(self, folder: str | os.PathLike) -> Path:
        return write_wav(Path(folder) / self.ref.file_name, self.waveform, self.sample_rate_hertz, self.loop_points)


@dataclass
class ImageResult:
    """Everything the stream said about one image."""

    request_id: str
    scene: str = ""
    mood: str = ""
    description: common_pb2.SceneDescription | None = None
    clips: list[Clip] = field(default_factory=list)
    failed: list[pb.ClipFailed] = field(default_factory=list)
    summary: pb.ImageSummary | None = None
    error: pb.ImageFailed | None = None
    _by_id: dict[str, Clip] = field(default_factory=dict, repr=False)
    _sources: SourceMerge = field(default_factory=SourceMerge, repr=False)

    def add(self, event: pb.ImageToSoundEvent) -> None:
        """Folds one event into the result."""
        kind = event.WhichOneof("event")
        if kind == "scene":
            self.scene, self.mood = event.scene.scene, event.scene.mood
        elif kind == "source":
            self._sources.add(event.source)
        elif kind == "description":
            self.description = event.description
        elif kind == "audio":
            clip = self._clip(event.audio.clip)
            chunk = event.audio.chunk
            if chunk.sequence_number != len(clip.payloads):
                raise ValueError(f"clip {clip.ref.clip_id}: chunk {chunk.sequence_number} out of order")
            clip.payloads.append(chunk.data)
            clip.encoding = chunk.encoding
            clip.sample_rate_hertz = chunk.sample_rate_hertz
            clip.channels = chunk.channels or 1
        elif kind == "clip_done":
            clip = self._clip(event.clip_done.clip)
            clip.prompt, clip.metadata, clip.done = event.clip_done.prompt, event.clip_done.metadata, True
            if event.clip_done.HasField("mix"):
                clip.mix = event.clip_done.mix
        elif kind == "clip_failed":
            self.failed.append(event.clip_failed)
        elif kind == "summary":
            self.summary = event.summary
        elif kind == "image_failed":
            self.error = event.image_failed

    def _clip(self, ref: pb.ClipRef) -> Clip:
        clip = self._by_id.get(ref.clip_id)
        if clip is None:
            clip = Clip(ref=ref)
            source = self._sources.get(ref.source_id)
            if source is not None:
                clip.source_name = source.name
                clip.location = source.location if source.HasField("location") else None
                for variant in source.variants:
                    if variant.id == ref.variant_id:
                        clip.variant = variant
                        clip.action = variant.action
                        clip.instrument_role = role_name(variant.instrument_role)
            self._by_id[ref.clip_id] = clip
            self.clips.append(clip)
        return clip

    @property
    def ok(self) -> bool:
        return self.error is None and self.summary is not None and not self.failed

    def save_wavs(self, folder: str | os.PathLike) -> list[Path]:
        return [clip.save(folder) for clip in self.clips if clip.done]


def collect(events: Iterable[pb.ImageToSoundEvent]) -> dict[str, ImageResult]:
    """Folds an event stream (one or many images) into results by request_id."""
    results: dict[str, ImageResult] = {}
    for event in events:
        results.setdefault(event.request_id, ImageResult(event.request_id)).add(event)
    return results


def security_credentials(
    credentials: grpc.ChannelCredentials | None = None,
    call_credentials: grpc.CallCredentials | None = None,
    *,
    tls_ca_file: str | None = None,
    tls_cert_file: str | None = None,
    tls_key_file: str | None = None,
    token: str | None = None,
    token_file: str | None = None,
) -> tuple[grpc.ChannelCredentials | None, grpc.CallCredentials | None]:
    """Channel and call credentials from files: TLS with the CA of the server's certificate (or the
    system's roots when only a client certificate is given), mutual TLS with tls_cert_file + tls_key_file,
    a bearer token given or read from token_file (re-read when it changes). Explicit credentials win."""
    if credentials is None:
        credentials = security.client_credentials(tls_ca_file, tls_cert_file, tls_key_file)
    if call_credentials is None:
        call_credentials = security.token_call_credentials(token, token_file)
    return credentials, call_credentials


class OrchestratorUnavailable(ConnectionError):
    """The orchestrator did not answer, or did not become ready, in time; the message says what to check."""


def unavailable_message(target: str, waited: float, listening: bool) -> str:
    if listening:
        return (f"the orchestrator at {target} answers but was not ready within {waited:.0f} s (its model services "
                f"are still loading, or one of them is down): wait longer, or check the services' logs")
    return (f"nothing answers at {target} (waited {waited:.0f} s): is the orchestrator running? Start the services "
            f"(README \"Phase 2\": i2s-vlm, i2s-audio, i2s-orchestrator), or check the host and port")


class _Connection:
    """What both clients hold: the target, the default timeout, the credentials, the channel and its stub."""

    def __init__(self, target: str = "127.0.0.1:50050", timeout: float = DEFAULT_TIMEOUT_SECONDS, *,
                 credentials: grpc.ChannelCredentials | None = None,
                 call_credentials: grpc.CallCredentials | None = None, **security_files: str | None):
        """`credentials`: TLS (grpc.ssl_channel_credentials); `call_credentials`: e.g. a bearer token.
        Or from files (see `security_credentials`): tls_ca_file, tls_cert_file, tls_key_file, token, token_file."""
        self.timeout = timeout
        self.target = target
        credentials, call_credentials = security_credentials(credentials, call_credentials, **security_files)
        self._credentials = (credentials, call_credentials)
        self._channel = self._open_channel(target, credentials, call_credentials)
        self._stub = orchestrator_pb2_grpc.OrchestratorStub(self._channel)

    def _open_channel(self, target: str, credentials, call_credentials):
        raise NotImplementedError


class ImageToSoundClient(_Connection):
    """Blocking client. Thread-safe; keep one per process and reuse it."""

    def _open_channel(self, target: str, credentials, call_credentials):
        return channels.sync_channel(target, credentials, call_credentials)

    def wait_for_ready(self, timeout: float = 60.0) -> None:
        """Returns once the orchestrator says SERVING (its model services are loaded); until then a call
        would fail UNAVAILABLE. Raises OrchestratorUnavailable after `timeout` seconds, saying whether
        anything answered at all."""
        # The channel checks health itself: it is ready only once a backend says SERVING.
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            listening = channels.answers(self.target, *self._credentials)
            raise OrchestratorUnavailable(unavailable_message(self.target, timeout, listening)) from None

    def stream(self, image: ImageInput | None = None, *, timeout: float | None = None, **kwargs) -> Iterator[pb.ImageToSoundEvent]:
        """The raw event stream of one image (see make_request for the arguments)."""
        request = make_request(image, **kwargs)
        yield from self._stub.ImageToSound(request, timeout=timeout or self.timeout)

    def generate(self, image: ImageInput | None = None, **kwargs) -> ImageResult:
        """Runs one image to the end and returns its clips, decoded."""
        results = collect(self.stream(image, **kwargs))
        return next(iter(results.values()))

    def stream_many(self, requests: Iterable[pb.ImageToSoundRequest], config: pb.StreamConfig | None = None,
                    timeout: float | None = None) -> Iterator[pb.ImageToSoundEvent]:
        """Bidirectional: sends requests as the iterable yields them; events of all images, interleaved."""

        def messages():
            if config is not None:
                yield pb.StreamImagesToSoundRequest(config=config)
            for request in requests:
                yield pb.StreamImagesToSoundRequest(image=request)

        yield from self._stub.StreamImagesToSound(messages(), timeout=timeout or self.timeout)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "ImageToSoundClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncImageToSoundClient(_Connection):
    """asyncio client; same calls as ImageToSoundClient, as async iterators / coroutines."""

    def _open_channel(self, target: str, credentials, call_credentials):
        return channels.aio_channel(target, credentials, call_credentials)

    async def stream(self, image: ImageInput | None = None, *, timeout: float | None = None, **kwargs) -> AsyncIterator[pb.ImageToSoundEvent]:
        request = make_request(image, **kwargs)
        async for event in self._stub.ImageToSound(request, timeout=timeout or self.timeout):
            yield event

    async def generate(self, image: ImageInput | None = None, **kwargs) -> ImageResult:
        result: ImageResult | None = None
        async for event in self.stream(image, **kwargs):
            result = result or ImageResult(event.request_id)
            result.add(event)
        assert result is not None
        return result

    async def stream_many(self, requests: AsyncIterable[pb.ImageToSoundRequest] | Iterable[pb.ImageToSoundRequest],
                          config: pb.StreamConfig | None = None, timeout: float | None = None) -> AsyncIterator[pb.ImageToSoundEvent]:
        async def messages():
            if config is not None:
                yield pb.StreamImagesToSoundRequest(config=config)
            if hasattr(requests, "__aiter__"):
                async for request in requests:
                    yield pb.StreamImagesToSoundRequest(image=request)
            else:
                for request in requests:
                    yield pb.StreamImagesToSoundRequest(image=request)

        async for event in self._stub.StreamImagesToSound(messages(), timeout=timeout or self.timeout):
            yield event

    async def close(self) -> None:
        await self._channel.close()

    async def wait_for_ready(self, timeout: float = 60.0) -> None:
        """As ImageToSoundClient.wait_for_ready."""
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except asyncio.TimeoutError:
            listening = await asyncio.to_thread(channels.answers, self.target, *self._credentials)
            raise OrchestratorUnavailable(unavailable_message(self.target, timeout, listening)) from None

    async def __aenter__(self) -> "AsyncImageToSoundClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
