"""The whole orchestrator request checked before any model is called.

A request that would fail later (a NaN duration after the VLM has spent seconds describing the image; a
description with ten thousand sources) is refused up front with INVALID_ARGUMENT. The bounds are not
written again here: decoding and audio settings go through the model services' own validate functions,
images through serving.images, text through i2s_formats.seed_format.clean_text (what the description parser
applies to files).
"""
from __future__ import annotations

import math
import uuid

from image_to_sound.v1 import common_pb2, orchestrator_pb2 as pb
from i2s_formats import seed_format
from serving.errors import InvalidInput
from serving.images import check_declared

MAX_REQUEST_ID_CHARS = 128
MAX_ID_CHARS = 32  # source and variant ids of a hand-made description
MAX_SOURCES = 64
MAX_VARIANTS_PER_SOURCE = 16
_ROLES = set(common_pb2.InstrumentRole.values())
# The audio service validates the real prompt; this stands in for it while the caption is not yet made.
_PLACEHOLDER_PROMPT = "a placeholder caption"


def clean_request_id(raw: str) -> str:
    """The id echoed on every event and used in clip ids and logs: no control characters (no forged log
    lines), at most MAX_REQUEST_ID_CHARS; a fresh one when nothing printable is left."""
    return seed_format.clean_text(raw, MAX_REQUEST_ID_CHARS) or uuid.uuid4().hex[:12]


def validate_request(request: pb.ImageToSoundRequest, max_clips_per_image: int) -> pb.ImageToSoundRequest:
    """Raises InvalidInput for anything a model service would refuse later; returns the request with the
    request id and a hand-made description cleaned."""
    from audio_service.config import AudioConfig
    from audio_service.server import audio_request, chunk_settings
    from vlm_service.server import decoding_options

    which = request.WhichOneof("input")
    if which is None:
        raise InvalidInput("request needs an image or a description")
    if request.options.max_clips > max_clips_per_image:
        raise InvalidInput(f"options.max_clips={request.options.max_clips}; at most {max_clips_per_image} per image")
    if not request.options.skip_audio:
        defaults = AudioConfig()
        audio_request(_PLACEHOLDER_PROMPT, request.audio, defaults)
        chunk_settings(request.audio, defaults)
    cleaned = pb.ImageToSoundRequest()
    cleaned.CopyFrom(request)
    cleaned.request_id = clean_request_id(request.request_id)
    if which == "image":
        decoding_options(request.decoding)
        check_declared(request.image.data, request.image.mime_type)
    else:
        cleaned.description.CopyFrom(clean_description(request.description, need_variants=not request.options.skip_audio))
    return cleaned


def clean_description(description: common_pb2.SceneDescription, need_variants: bool = True) -> common_pb2.SceneDescription:
    """A client's description, held to what the VLM itself can produce: bounded counts, confidences in
    0..1, known instrument roles (else INVALID_ARGUMENT); text cleaned and cut as the file parser does."""
    if not description.sources:
        raise InvalidInput("description has no sound sources")
    if len(description.sources) > MAX_SOURCES:
        raise InvalidInput(f"description has {len(description.sources)} sound sources; at most {MAX_SOURCES}")
    out = common_pb2.SceneDescription()
    out.CopyFrom(description)
    out.scene = seed_format.clean_text(description.scene, seed_format.MAX_SCENE_CHARS)
    out.mood = seed_format.clean_text(description.mood, seed_format.MAX_MOOD_CHARS)
    for i, source in enumerate(out.sources, start=1):
        where = f"sources[{i - 1}]"
        if len(source.variants) > MAX_VARIANTS_PER_SOURCE:
            raise InvalidInput(f"{where} has {len(source.variants)} variants; at most {MAX_VARIANTS_PER_SOURCE}")
        if source.HasField("location"):
            box = source.location
            corners = (box.x_min, box.y_min, box.x_max, box.y_max)
            if not all(math.isfinite(c) and 0.0 <= c <= 1.0 for c in corners) or box.x_min > box.x_max or box.y_min > box.y_max:
                raise InvalidInput(f"{where}.location must be a normalised box (0..1, min <= max)")
        source.id = seed_format.clean_text(source.id, MAX_ID_CHARS) or f"s{i}"
        source.name = seed_format.clean_text(source.name, seed_format.MAX_NAME_CHARS)
        source.material = seed_format.clean_text(source.material, seed_format.MAX_MATERIAL_CHARS)
        for j, variant in enumerate(source.variants, start=1):
            at = f"{where}.variants[{j - 1}]"
            if variant.HasField("confidence") and not (math.isfinite(variant.confidence) and 0.0 <= variant.confidence <= 1.0):
                raise InvalidInput(f"{at}.confidence={variant.confidence} must be within 0..1")
            if variant.instrument_role not in _ROLES:
                raise InvalidInput(f"{at}.instrument_role={variant.instrument_role} is not a known InstrumentRole")
            variant.id = seed_format.clean_text(variant.id, MAX_ID_CHARS) or f"{source.id}v{j}"
            variant.action = seed_format.clean_text(variant.action, seed_format.MAX_ACTION_CHARS)
            timbre = [w for w in (seed_format.clean_text(t, seed_format.MAX_TIMBRE_CHARS) for t in variant.timbre) if w]
            del variant.timbre[:]
            variant.timbre.extend(timbre[: seed_format.MAX_TIMBRE_WORDS])
    if need_variants and not any(source.variants for source in out.sources):
        raise InvalidInput("description has no variant to render")
    return out
