"""python -m bench.mixed_traffic [--vlm-model DIR --audio-model DIR --device cpu --images 64]

Mixed traffic on the real services (embedded: three processes), figures for docs/performance.md:
- time to first audio of one interactive image alone; while a batch run of `--images` images streams
  (`priority=batch`, as `main.py` sends a folder); and the same during the run with the image sent as batch too,
  one class for all, which is first come first served, as every queue was before priorities;
- latency of a result-cache hit against a miss, for a clip (GenerateAudio) and a description
  (StreamSceneDescription), seeded requests.
Prints a table and writes JSON to --json (default $OUT/mixed_traffic.json when $OUT is set).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

import grpc

from i2s_cli.embedded import EmbeddedServices
from image_to_sound.v1 import (audio_pb2, audio_pb2_grpc, common_pb2, orchestrator_pb2 as pb, orchestrator_pb2_grpc,
                               vision_pb2, vision_pb2_grpc)

REPO = Path(__file__).resolve().parent.parent
PHOTOS = sorted(p for p in (REPO / "data").rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
AUDIO = common_pb2.AudioSettings(duration_seconds=1.0, num_inference_steps=4)
DECODING = common_pb2.DecodingSettings()  # the default budget: the tiny model's JSON needs it to name sources


def image_request(index: int, priority: int) -> pb.ImageToSoundRequest:
    photo = PHOTOS[index % len(PHOTOS)]
    return pb.ImageToSoundRequest(
        request_id=f"img-{index}", image=common_pb2.Image(data=photo.read_bytes()), audio=AUDIO, decoding=DECODING,
        options=pb.PipelineOptions(max_clips=2, priority=priority))


STAGES: list[dict] = []  # per timed image: where its time to first audio went (from its summary)


async def time_to_first_audio(stub, priority: int, index: int) -> float | None:
    """Seconds to the image's first audio chunk (None: it made no clip)."""
    started = time.perf_counter()
    first = None
    async for event in stub.ImageToSound(image_request(index, priority), timeout=1800):
        if first is None and event.WhichOneof("event") == "audio":
            first = time.perf_counter() - started
        if event.WhichOneof("event") == "summary":
            s = event.summary
            STAGES.append({"priority": priority, "first_audio_s": first, "scene_s": s.time_to_scene_seconds,
                           "vlm_first_token_s": s.vlm_stats.time_to_first_token_seconds,
                           "vlm_total_s": s.vlm_stats.total_seconds, "vlm_tokens": s.vlm_stats.output_tokens})
    return first


async def batch_run(stub, images: int, started: asyncio.Event) -> float:
    async def requests():
        for i in range(images):
            yield pb.StreamImagesToSoundRequest(image=image_request(1000 + i, common_pb2.PRIORITY_BATCH))

    begun = time.perf_counter()
    try:
        async for event in stub.StreamImagesToSound(requests(), timeout=3600):
            if event.WhichOneof("event") == "audio":
                started.set()
    finally:
        started.set()  # a run that made no audio at all must not leave the measurement waiting
    return time.perf_counter() - begun


async def during_batch(stub, images: int, priority: int, samples: int) -> tuple[list[float], float]:
    started = asyncio.Event()
    run = asyncio.ensure_future(batch_run(stub, images, started))
    await started.wait()  # the run is under way: every queue holds batch work
    times = []
    for i in range(samples):
        if run.done():
            break
        seconds = await time_to_first_audio(stub, priority, i)
        if seconds is not None:
            times.append(seconds)
    return times, await run


async def timed_stream(call) -> tuple[float, list]:
    started = time.perf_counter()
    responses = [r async for r in call]
    return time.perf_counter() - started, responses


async def cache_latencies(audio_target: str, vlm_target: str) -> dict:
    out = {}
    async with grpc.aio.insecure_channel(audio_target) as channel:
        stub = audio_pb2_grpc.AudioServiceStub(channel)
        settings = common_pb2.AudioSettings(duration_seconds=1.0, num_inference_steps=4, seed=123)
        request = audio_pb2.GenerateAudioRequest(prompt="rain drumming on a tin roof", settings=settings)
        miss, _ = await timed_stream(stub.GenerateAudio(request, timeout=600))
        hits = [(await timed_stream(stub.GenerateAudio(request, timeout=600)))[0] for _ in range(5)]
        out["audio"] = {"miss_s": miss, "hit_s": statistics.median(hits)}
    async with grpc.aio.insecure_channel(vlm_target) as channel:
        stub = vision_pb2_grpc.VisionServiceStub(channel)
        request = vision_pb2.StreamSceneDescriptionRequest(
            image=common_pb2.Image(data=PHOTOS[0].read_bytes()),
            decoding=common_pb2.DecodingSettings(max_new_tokens=200, seed=5, temperature=0.3, top_p=0.8))
        miss, _ = await timed_stream(stub.StreamSceneDescription(request, timeout=600))
        hits = [(await timed_stream(stub.StreamSceneDescription(request, timeout=600)))[0] for _ in range(5)]
        out["vlm"] = {"miss_s": miss, "hit_s": statistics.median(hits)}
    return out


async def measure(target: str, services: EmbeddedServices, images: int, samples: int) -> dict:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
        await time_to_first_audio(stub, common_pb2.PRIORITY_INTERACTIVE, 999)  # warm every path once
        alone = [t for i in range(samples)
                 if (t := await time_to_first_audio(stub, common_pb2.PRIORITY_INTERACTIVE, i)) is not None]
        prioritised, run_s = await during_batch(stub, images, common_pb2.PRIORITY_INTERACTIVE, samples)
        one_class, run_fifo_s = await during_batch(stub, images, common_pb2.PRIORITY_BATCH, samples)
    ports = {name: (services.log_dir / f"{name}.port").read_text().strip() for name in ("vlm", "audio")}
    cache = await cache_latencies(f"127.0.0.1:{ports['audio']}", f"127.0.0.1:{ports['vlm']}")
    median = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
    return {"images": images, "samples": samples,
            "ttfa_alone_s": median(alone), "ttfa_interactive_during_batch_s": median(prioritised),
            "ttfa_one_class_during_batch_s": median(one_class), "batch_run_s": run_s,
            "batch_run_one_class_s": run_fifo_s,
            "raw": {"alone": alone, "interactive": prioritised, "one_class": one_class}, "stages": STAGES,
            "cache": cache}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.mixed_traffic", description=__doc__.splitlines()[0])
    p.add_argument("--vlm-model", default=str(REPO / "models/tiny/vlm"))
    p.add_argument("--audio-model", default=str(REPO / "models/tiny/audio"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--samples", type=int, default=3, help="interactive images timed in each condition")
    out = os.environ.get("OUT")
    p.add_argument("--json", default=os.path.join(out, "mixed_traffic.json") if out else None)
    args = p.parse_args(argv)
    services = EmbeddedServices(vlm_model=args.vlm_model, audio_model=args.audio_model, device=args.device,
                                relay_logs=False)
    target = services.start()
    try:
        result = asyncio.run(measure(target, services, args.images, args.samples))
    finally:
        services.stop()
        services.close()
    rows = [("TTFA interactive, alone", result["ttfa_alone_s"]),
            (f"TTFA interactive, during a {args.images}-image batch run", result["ttfa_interactive_during_batch_s"]),
            ("TTFA same image as batch (one class = FIFO, before priorities)", result["ttfa_one_class_during_batch_s"]),
            ("audio clip: cache miss", result["cache"]["audio"]["miss_s"]),
            ("audio clip: cache hit (median of 5)", result["cache"]["audio"]["hit_s"]),
            ("description: cache miss", result["cache"]["vlm"]["miss_s"]),
            ("description: cache hit (median of 5)", result["cache"]["vlm"]["hit_s"])]
    for name, seconds in rows:
        print(f"{name:70s} {seconds:8.3f} s" if seconds is not None else f"{name:70s}      n/a")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
