"""The Python client of the image-to-sound orchestrator: what a Phase 2 program imports.

It knows the public contract (the image_to_sound.v1 messages, the audio encodings and the description
format in i2s_formats) and the shared channel settings in serving, never a service's own modules.

    from i2s_client import ImageToSoundClient
"""
from i2s_client.client import (
    DEFAULT_TIMEOUT_SECONDS,
    AsyncImageToSoundClient,
    Clip,
    ImageResult,
    ImageToSoundClient,
    OrchestratorUnavailable,
    collect,
    make_request,
    to_image,
)

__all__ = [
    "DEFAULT_TIMEOUT_SECONDS", "AsyncImageToSoundClient", "Clip", "ImageResult", "ImageToSoundClient",
    "OrchestratorUnavailable", "collect", "make_request", "to_image",
]
