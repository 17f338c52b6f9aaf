"""python -m bench.long_clips --model models/tiny/audio [--device cpu] [--steps 10] [--window-frames 256] [--repeats 3]

Long clips (docs/architecture.md "Long clips, loops and the speech/music guard"): time to the first chunk of
a 60 s clip against a 10 s clip (goal: within 1.2x; medians of alternated runs, the 60 s call left after its
first chunk), and the cost of each extra window (between the ends of consecutive windows' denoising in one
whole 60 s clip). Runs the audio servicer in process on the given checkpoint
(the tiny one's native window is 2.56 s; --window-frames 256 gives it cvssp/audioldm2's 10.24 s, so the
ratio is the real model's). Prints one JSON line per clip and a summary. A figure, not a test.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from audio_service.config import AudioConfig
from audio_service.diffusers_backend import DiffusersAudioBackend
from audio_service.long_clips import WindowPlan
from audio_service.server import AudioServicer
from image_to_sound.v1 import audio_pb2, common_pb2


async def one_clip(servicer: AudioServicer, seconds: float, steps: int, seed: int, *, whole: bool = True) -> dict:
    """Time to the first chunk; with `whole`, also the total and each window's time (between the ends of
    consecutive windows' denoising, from the progress events); else the call is left after the first chunk."""
    settings = common_pb2.AudioSettings(duration_seconds=seconds, num_inference_steps=steps, seed=seed)
    started = time.perf_counter()
    first, window_ends, windows = None, [], 1
    stream = servicer.GenerateAudio(audio_pb2.GenerateAudioRequest(prompt="rain on a tin roof", settings=settings), None)
    async for event in stream:
        now = time.perf_counter() - started
        if event.WhichOneof("event") == "progress" and event.progress.steps_done % steps == 0:
            window_ends.append(now)
        elif event.WhichOneof("event") == "chunk":
            first = first if first is not None else now
            if not whole:
                break
            if event.chunk.last:
                windows = event.chunk.metadata.window_count or 1
    await stream.aclose()
    row = {"seconds": seconds, "first_chunk_s": round(first, 3)}
    if whole:
        row.update(total_s=round(time.perf_counter() - started, 3), windows=windows,
                   window_s=[round(b - a, 3) for a, b in zip(window_ends, window_ends[1:])])
    return row


async def main_async(args: argparse.Namespace) -> None:
    backend = DiffusersAudioBackend(args.model, device=args.device, prompt_cache_size=8,
                                    window_frames=args.window_frames or None)
    backend.load()
    backend.warmup()
    servicer = AudioServicer(backend, AudioConfig(model=args.model, max_wait_ms=0))
    shape = backend.window_shape()
    print(json.dumps({"window_seconds": shape.seconds,
                      "overlap_seconds": WindowPlan.for_clip(shape, 1).overlap_samples / shape.sample_rate_hertz}),
          flush=True)
    await one_clip(servicer, 2.0, args.steps, 0)  # first calls of this process before timing
    firsts: dict[float, list[float]] = {10.0: [], 60.0: []}
    for repeat in range(args.repeats):  # alternated, so load from other jobs falls on both
        for seconds in (10.0, 60.0):
            row = await one_clip(servicer, seconds, args.steps, repeat, whole=False)
            firsts[seconds].append(row["first_chunk_s"])
            print(json.dumps(row), flush=True)
    whole = await one_clip(servicer, 60.0, args.steps, 99)
    print(json.dumps(whole), flush=True)
    print(json.dumps({
        "first_chunk_median_s": {str(k): statistics.median(v) for k, v in firsts.items()},
        "first_chunk_ratio_60_vs_10": round(statistics.median(firsts[60.0]) / statistics.median(firsts[10.0]), 3),
        "seconds_per_extra_window_median": statistics.median(whole["window_s"]) if whole["window_s"] else None,
    }), flush=True)
    await servicer.close()
    backend.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default=None)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--window-frames", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
