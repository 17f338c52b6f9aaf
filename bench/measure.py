"""Measurements through gRPC, as a client sees them. Each returns plain numbers (seconds unless named)."""
from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

from image_to_sound.v1 import (
    audio_pb2,
    audio_pb2_grpc,
    common_pb2,
    orchestrator_pb2,
    orchestrator_pb2_grpc,
    vision_pb2,
    vision_pb2_grpc,
)

CAPTIONS = [
    "A dog barks while rain falls on a tin roof",
    "Footsteps crunch on gravel as a person walks slowly",
    "A kettle whistles loudly as water boils on a stove",
    "Ocean waves crash on rocks and recede over sand",
    "A wooden door creaks open slowly on rusty hinges",
    "Glass bottles clink together on a wooden table",
    "Wind blows hard through tall trees and rustles the leaves",
    "A fire crackles and pops in a stone fireplace",
]
TIMEOUT = 900.0


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


async def vlm_once(stub: vision_pb2_grpc.VisionServiceStub, image: bytes, decoding: common_pb2.DecodingSettings) -> dict:
    """One StreamSceneDescription: client-side time to the first source, and the service's own stats.

    ms per output token = (total - time to first token) / (output tokens - 1): decode only, prefill apart.
    """
    started = time.perf_counter()
    first_source = None
    final = None
    async for event in stub.StreamSceneDescription(
        vision_pb2.StreamSceneDescriptionRequest(image=common_pb2.Image(data=image, mime_type="image/png"),
                                                 decoding=decoding), timeout=TIMEOUT):
        kind = event.WhichOneof("event")
        if kind == "source" and first_source is None:
            first_source = time.perf_counter() - started
        elif kind == "final":
            final = event.final
    wall = time.perf_counter() - started
    stats = final.stats if final is not None else common_pb2.DescriptionStats()
    decode = stats.total_seconds - stats.time_to_first_token_seconds
    return {
        "prompt_tokens": stats.prompt_tokens,
        "output_tokens": stats.output_tokens,
        "prefill_s": stats.time_to_first_token_seconds,
        "ms_per_token": 1000 * decode / (stats.output_tokens - 1) if stats.output_tokens > 1 else None,
        "time_to_first_source_s": first_source,
        "wall_s": wall,
    }


async def vlm_concurrent(stub: vision_pb2_grpc.VisionServiceStub, image: bytes,
                         decoding: common_pb2.DecodingSettings, clients: int) -> dict:
    """``clients`` descriptions at once (the engine decodes them together): images per minute, and the
    median per-request ms per output token and time to the first source."""
    started = time.perf_counter()
    runs = await asyncio.gather(*(vlm_once(stub, image, decoding) for _ in range(clients)))
    wall = time.perf_counter() - started
    return {"clients": clients, "wall_s": wall, "images_per_minute": 60.0 * clients / wall,
            **{k: v for k, v in summarise_vlm(list(runs)).items() if k in ("ms_per_token", "time_to_first_source_s")}}


async def audio_clip(stub: audio_pb2_grpc.AudioServiceStub, caption: str, settings: common_pb2.AudioSettings) -> float:
    """Seconds from the request to the clip's last chunk."""
    started = time.perf_counter()
    samples = 0
    async for event in stub.GenerateAudio(audio_pb2.GenerateAudioRequest(prompt=caption, settings=settings),
                                          timeout=TIMEOUT):
        if event.WhichOneof("event") == "chunk" and event.chunk.last:
            samples = event.chunk.metadata.num_samples
    if samples == 0:
        raise RuntimeError("the audio stream ended without a last chunk")
    return time.perf_counter() - started


async def audio_per_clip(stub, batch: int, settings: common_pb2.AudioSettings, repeats: int) -> float | None:
    """Seconds per clip with `batch` concurrent requests (the service batches them), median of repeats."""
    per_clip = []
    for r in range(repeats):
        started = time.perf_counter()
        await asyncio.gather(*(audio_clip(stub, CAPTIONS[(i + r) % len(CAPTIONS)], settings) for i in range(batch)))
        per_clip.append((time.perf_counter() - started) / batch)
    return median(per_clip)


async def e2e_image(stub: orchestrator_pb2_grpc.OrchestratorStub, image: bytes,
                    decoding: common_pb2.DecodingSettings, audio: common_pb2.AudioSettings, max_clips: int) -> dict:
    """One ImageToSound: time to the first audio chunk and to the end of the stream; clips done/failed."""
    started = time.perf_counter()
    first_audio = None
    done = failed = 0
    request = orchestrator_pb2.ImageToSoundRequest(
        image=common_pb2.Image(data=image, mime_type="image/png"), decoding=decoding, audio=audio,
        options=orchestrator_pb2.PipelineOptions(max_clips=max_clips),
    )
    async for event in stub.ImageToSound(request, timeout=TIMEOUT):
        kind = event.WhichOneof("event")
        if kind == "audio" and first_audio is None:
            first_audio = time.perf_counter() - started
        elif kind == "clip_done":
            done += 1
        elif kind == "clip_failed":
            failed += 1
    return {"first_audio_s": first_audio, "per_image_s": time.perf_counter() - started,
            "clips_done": done, "clips_failed": failed}


async def e2e_throughput(stub, image: bytes, decoding, audio, max_clips: int, clients: int,
                         images_per_client: int) -> dict:
    """`clients` concurrent callers, each sending its images one after another: images per minute."""

    async def client() -> list[dict]:
        return [await e2e_image(stub, image, decoding, audio, max_clips) for _ in range(images_per_client)]

    started = time.perf_counter()
    results = [r for rs in await asyncio.gather(*(client() for _ in range(clients))) for r in rs]
    wall = time.perf_counter() - started
    return {"clients": clients, "images": len(results), "wall_s": wall,
            "images_per_minute": 60.0 * len(results) / wall,
            "per_image_s_median": median([r["per_image_s"] for r in results])}


def summarise_vlm(runs: list[dict[str, Any]]) -> dict:
    """Medians over the runs (the first run after SERVING included: no request may pay for a cold start)."""
    pick = lambda key: median([r[key] for r in runs if r[key] is not None])  # noqa: E731
    return {key: pick(key) for key in ("prompt_tokens", "output_tokens", "prefill_s", "ms_per_token",
                                       "time_to_first_source_s", "wall_s")}
