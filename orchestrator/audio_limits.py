"""What the audio service makes (its GetAudioLimits answer), so the orchestrator refuses a request that every
clip of it would fail, at its own edge and before the VLM spends seconds on the image.

The answer is asked once the audio service serves, then every `refresh_seconds` (an operator who changes the
audio deployment's --max-clip-seconds rolls its replicas; the orchestrator follows within that time). An
audio service that predates the RPC answers UNIMPLEMENTED: no edge check, its own edge still refuses (each
clip then fails alone). An audio service that cannot answer now keeps the last answer.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

import grpc

from i2s_formats.contract import ImageRequest
from image_to_sound.v1 import audio_pb2
from serving.errors import InvalidInput

log = logging.getLogger(__name__)
ASK_TIMEOUT_SECONDS = 5.0


class AudioLimits:
    def __init__(self) -> None:
        self.known: audio_pb2.AudioLimits | None = None  # None: not asked yet, or the service has no such RPC

    def check(self, request: ImageRequest) -> None:
        """InvalidInput when the audio service would refuse every clip of `request` (nothing known: no check)."""
        limits = self.known
        if limits is None or request.skip_audio:
            return
        audio = request.audio
        if audio.duration_seconds > limits.max_clip_seconds:
            raise InvalidInput(f"audio.duration_seconds={audio.duration_seconds:g}: the audio service makes clips "
                               f"of at most {limits.max_clip_seconds:g} s")
        if audio.reject_speech_music and not limits.speech_music_guard:
            raise InvalidInput(f"audio.reject_speech_music={audio.reject_speech_music}: the audio service has no "
                               "speech/music guard (its backend does not score clips)")

    async def ask(self, stub) -> None:
        """Ask the audio service (`stub`: its AudioServiceStub) what it makes now."""
        try:
            self.known = await stub.GetAudioLimits(audio_pb2.GetAudioLimitsRequest(), timeout=ASK_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                self.known = None  # an older audio service: its own edge refuses
            else:
                log.info("audio limits not refreshed (%s: %s); keeping the last answer", exc.code().name,
                         exc.details())

    async def keep_asking(self, stub: Callable[[], object], refresh_seconds: float) -> None:
        """Ask again every `refresh_seconds`, through the current stub (channels are replaced when TLS files
        rotate); the first answer is the caller's own :meth:`ask`."""
        while True:
            await asyncio.sleep(refresh_seconds)  # polling a remote setting, not synchronising
            await self.ask(stub())
