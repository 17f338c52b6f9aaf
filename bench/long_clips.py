"""python -m bench.long_clips --model models/tiny/audio [--device cpu] [--steps 10] [--window-frames 256]

Long clips (docs/architecture.md "Long clips, loops and the speech/music guard"): time to the first chunk of
a 60 s clip against a 10 s clip (goal: within 1.2x), and the cost of each extra window (a 60 s and a 40 s
clip: (t60 - t40) / (windows60 - windows40)). Runs the audio servicer in process on the given checkpoint
(the tiny one's native window is 2.56 s; --window-frames 256 gives it cvssp/audioldm2's 10.24 s, so the
ratio is the real model's). Prints one JSON line per clip and a summary. A figure, not a test.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time

from audio_service.config import AudioConfig
from audio_service.diffusers_backend import DiffusersAudioBackend
from audio_service.long_clips import WindowPlan
from audio_service.server import AudioServicer
from image_to_sound.v1 import audio_pb2, common_pb2


async def one_clip(servicer: AudioServicer, seconds: float, steps: int, seed: int) -> dict:
    settings = common_pb2.AudioSettings(duration_seconds=seconds, num_inference_steps=steps, seed=seed)
    started = time.perf_counter()
    first = None
    async for event in servicer.GenerateAudio(audio_pb2.GenerateAudioRequest(prompt="rain on a tin roof",
                                                                             settings=settings), None):
        if event.WhichOneof("event") == "chunk":
            first = first if first is not None else time.perf_counter() - started
            if event.chunk.last:
                meta = event.chunk.metadata
    return {"seconds": seconds, "first_chunk_s": round(first, 3), "total_s": round(time.perf_counter() - started, 3),
            "windows": meta.window_count or 1}


async def main_async(args: argparse.Namespace) -> None:
    backend = DiffusersAudioBackend(args.model, device=args.device, prompt_cache_size=8,
                                    window_frames=args.window_frames or None)
    backend.load()
    backend.warmup()
    servicer = AudioServicer(backend, AudioConfig(model=args.model, max_wait_ms=0))
    shape = backend.window_shape()
    print(json.dumps({"window_seconds": shape.seconds,
                      "overlap_seconds": WindowPlan.for_clip(shape, 1).overlap_samples / shape.sample_rate_hertz}))
    await one_clip(servicer, 2.0, args.steps, 0)  # this length's shapes once before timing
    rows = {}
    for seconds in (10.0, 60.0, 40.0):
        rows[seconds] = await one_clip(servicer, seconds, args.steps, 1)
        print(json.dumps(rows[seconds]))
    r10, r60, r40 = rows[10.0], rows[60.0], rows[40.0]
    print(json.dumps({
        "first_chunk_ratio_60_vs_10": round(r60["first_chunk_s"] / r10["first_chunk_s"], 3),
        "seconds_per_extra_window": round((r60["total_s"] - r40["total_s"]) / (r60["windows"] - r40["windows"]), 3),
    }))
    await servicer.close()
    backend.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default=None)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--window-frames", type=int, default=256)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
