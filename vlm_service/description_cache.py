"""The VLM service's entries in the result cache (serving.result_cache): which descriptions, under which key,
as which bytes, and the stream events they replay.

Only a request with a decoding seed is cached (a seedless request asks for a new sample). The key is the hash
of the image's bytes as sent, every decoding option (seed included) and the backend's `result_identity()`
(model id and revision, prompt version, pixel budget, precision, device kind, decode path). The value is the
stream as it was sent (scene, sources, final), so a hit replays the same events; only finished descriptions
("stop" or "length") are stored. The final stats say `cache_hit`.
"""
from __future__ import annotations

import dataclasses
import json

from i2s_formats.contract import DecodingOptions
from image_to_sound.v1 import common_pb2, vision_pb2
from serving.result_cache import content_key, pack, unpack
from vlm_service.backend import DescriptionDone, SceneHeader, SourceFound, StreamEvent, VisionBackend

STORED_REASONS = ("stop", "length")  # a cancelled or cut description is no answer to keep


def description_key(image_bytes: bytes, decoding: DecodingOptions, backend: VisionBackend) -> str | None:
    """The key of a description, or None when it is not cached (no seed given, or revision unknown)."""
    identity = backend.result_identity()
    if decoding.seed is None or identity is None:
        return None
    return content_key("vlm", image=image_bytes, decoding=dataclasses.asdict(decoding), **identity)


def stats_message(done: DescriptionDone) -> common_pb2.DescriptionStats:
    return common_pb2.DescriptionStats(
        prompt_tokens=done.prompt_tokens,
        output_tokens=done.output_tokens,
        time_to_first_token_seconds=done.time_to_first_token_seconds,
        total_seconds=done.total_seconds,
        cache_hit=done.cache_hit,
    )


def stream_message(event: StreamEvent) -> vision_pb2.StreamSceneDescriptionResponse:
    """A backend event as StreamSceneDescription sends it."""
    if isinstance(event, SceneHeader):
        return vision_pb2.StreamSceneDescriptionResponse(
            scene=vision_pb2.SceneSummary(scene=event.scene, mood=event.mood))
    if isinstance(event, SourceFound):
        return vision_pb2.StreamSceneDescriptionResponse(source=event.source)
    return vision_pb2.StreamSceneDescriptionResponse(
        final=vision_pb2.DescribeSceneResponse(description=event.description, stats=stats_message(event)))


def pack_events(events: list[StreamEvent]) -> bytes:
    done = events[-1]
    assert isinstance(done, DescriptionDone)
    extra = json.dumps({"finish_reason": done.finish_reason, "model_steps": done.model_steps}).encode()
    return pack([extra, *(stream_message(event).SerializeToString() for event in events)])


def replay(value: bytes) -> list[StreamEvent]:
    """The events of a cached description, its end marked as a hit."""
    extra, *frames = unpack(value)
    details = json.loads(extra)
    events: list[StreamEvent] = []
    for frame in frames:
        message = vision_pb2.StreamSceneDescriptionResponse.FromString(frame)
        kind = message.WhichOneof("event")
        if kind == "scene":
            events.append(SceneHeader(message.scene.scene, message.scene.mood))
        elif kind == "source":
            events.append(SourceFound(message.source))
        else:
            stats = message.final.stats
            events.append(DescriptionDone(
                description=message.final.description, prompt_tokens=stats.prompt_tokens,
                output_tokens=stats.output_tokens, time_to_first_token_seconds=stats.time_to_first_token_seconds,
                total_seconds=stats.total_seconds, finish_reason=details["finish_reason"],
                model_steps=details["model_steps"], cache_hit=True))
    return events
