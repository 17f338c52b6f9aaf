"""python -m bench [all|audio|vlm] --device cuda | --tiny --device cpu

Builds (or reuses) the checkpoints, starts the project's real services as processes, measures through
gRPC, prints a compact table last and writes JSON to $OUT/bench.json (or --json PATH). See
docs/performance.md for what each number means and the exact GPU command.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import io
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from bench import checkpoints, measure, report
from bench.services import BenchServices, GpuMemorySampler, audio_startup_breakdown

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Profile:
    """What one run measures; full size and tiny run the same code with these numbers."""

    clip_seconds: float
    dpm_steps: int
    seed_ddim_steps: int
    audio_batches: tuple[int, ...]
    audio_repeats: int
    vlm_tokens: int  # fixed output length for timing: random weights never finish on their own
    vlm_runs: int
    seed_vlm_tokens: int  # the seed's long JSON answer (about 600 tokens), accounted at the sampled rate
    clients: int
    vlm_clients: tuple[int, ...]  # concurrent VLM requests (images per minute through the engine)
    images_per_client: int
    max_clips: int
    image_size: tuple[int, int]


FULL = Profile(clip_seconds=10.0, dpm_steps=20, seed_ddim_steps=200, audio_batches=(1, 4, 8), audio_repeats=3,
               vlm_tokens=300, vlm_runs=2, seed_vlm_tokens=600, clients=4, vlm_clients=(1, 8), images_per_client=1, max_clips=5,
               image_size=(1024, 768))
TINY = Profile(clip_seconds=1.0, dpm_steps=4, seed_ddim_steps=10, audio_batches=(1, 4, 8), audio_repeats=1,
               vlm_tokens=400, vlm_runs=2, seed_vlm_tokens=800, clients=2, vlm_clients=(1, 8), images_per_client=1, max_clips=2,
               image_size=(128, 96))
SEED_TEMPERATURE, SEED_TOP_P = 0.3, 0.8  # the seed's sampling settings
SEED_MIN_CLIPS = 5  # the seed keeps at least 5 variants per image


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("what", nargs="?", default="all", choices=["all", "audio", "vlm"],
                   help="all: both services, the orchestrator and the seed baseline; audio / vlm: one service")
    p.add_argument("--tiny", action="store_true", help="the tiny checkpoints (CPU, seconds): the harness itself")
    p.add_argument("--device", default=None, help="cuda, cuda:0, cpu (default: cuda if available)")
    p.add_argument("--vlm-model", default=None, help="real model id or dir (default: random Qwen2.5-VL-7B)")
    p.add_argument("--vlm-size", default="7b", choices=sorted(checkpoints.VLM_CONFIGS))
    p.add_argument("--audio-model", default=None, help="real model id or dir (default: random AudioLDM2 base)")
    p.add_argument("--audio-variant", default="base", choices=checkpoints.AUDIO_VARIANTS)
    p.add_argument("--vlm-args", default="", help='extra flags for the VLM service, e.g. "--max-queue 4"')
    p.add_argument("--audio-args", default="", help='extra flags for the audio service, after the bench defaults (write --audio-args="...")')
    p.add_argument("--clients", type=int, default=None, help="concurrent clients for images per minute (default 4; tiny 2)")
    p.add_argument("--no-engine-compare", dest="engine_compare", action="store_false",
                   help="vlm/all: skip the in-process engine vs generate() comparison (bench/engine_compare.py)")
    p.add_argument("--label", default="", help="a name for this variant, kept in the JSON")
    p.add_argument("--cache-dir", default=os.environ.get("BENCH_CACHE", str(Path(tempfile.gettempdir()) / "i2s-bench")),
                   help="where random checkpoints are written once and reused")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="stop starting measurements this many seconds after the bench started; the table and "
                        "JSON say what was skipped (the device run's budget)")
    p.add_argument("--json", default=None, help="write the JSON here (default: $OUT/bench.json when OUT is set)")
    return p.parse_args(argv)


def default_audio_args(tiny: bool) -> list[str]:
    """The fast path as the bench measures it by default; --audio-args come after and win."""
    if tiny:
        return ["--max-batch-size", "8", "--duration-buckets", "1"]
    return ["--max-batch-size", "8", "--compile", "reduce-overhead", "--duration-buckets", "10"]


def test_image(size: tuple[int, int]) -> bytes:
    """A deterministic photo-sized PNG (noise over gradients): the VLM sees size, not content, with random weights."""
    import numpy as np
    from PIL import Image

    w, h = size
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], axis=-1)
    pixels = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def environment(device: str) -> dict:
    import diffusers
    import torch
    import transformers

    gpu = None
    if device.startswith("cuda"):  # nvidia-smi, not torch: no CUDA context in the bench process
        try:
            gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=10).stdout.strip().splitlines()[0] or None
        except (OSError, IndexError, subprocess.SubprocessError):
            gpu = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except OSError:
        commit = None
    return {"device": device, "gpu": gpu, "torch": torch.__version__, "transformers": transformers.__version__,
            "diffusers": diffusers.__version__, "python": sys.version.split()[0], "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def materialise(args: argparse.Namespace, device: str, need_vlm: bool, need_audio: bool) -> dict:
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    out = {"vlm": None, "audio": None, "vlm_build_s": None, "audio_build_s": None}
    if need_vlm:
        if args.vlm_model:
            out["vlm"], out["vlm_build_s"] = args.vlm_model, 0.0
        else:
            path, seconds = (checkpoints.tiny_vlm(cache) if args.tiny else checkpoints.vlm_skeleton(cache, args.vlm_size))
            out["vlm"], out["vlm_build_s"] = str(path), seconds
    if need_audio:
        if args.audio_model:
            out["audio"], out["audio_build_s"] = args.audio_model, 0.0
        else:
            path, seconds = (checkpoints.tiny_audio(cache) if args.tiny else
                             checkpoints.in_subprocess("audio", cache, args.audio_variant, device))
            out["audio"], out["audio_build_s"] = str(path), seconds
    return out


async def measure_all(args, profile: Profile, targets: dict[str, str], image: bytes,
                      time_left=lambda: float("inf")) -> dict:
    """Every measurement the services allow, most important first; one whose turn comes with no time left
    (``time_left()`` seconds <= 0) is skipped and named in ``results["skipped"]``."""
    from image_to_sound.v1 import audio_pb2_grpc, common_pb2, orchestrator_pb2_grpc, vision_pb2_grpc
    from serving import channels

    results: dict = {"vlm": None, "vlm_seed_sampling": None, "vlm_concurrent": None, "audio": None, "seed_audio": None, "e2e": None,
                     "throughput": None, "skipped": []}

    def may(name: str) -> bool:
        if time_left() > 0:
            return True
        results["skipped"].append(name)
        return False

    opened = {name: channels.aio_channel(address) for name, address in targets.items()}
    try:
        if "vlm" in opened:
            stub = vision_pb2_grpc.VisionServiceStub(opened["vlm"])
            ours = common_pb2.DecodingSettings(max_new_tokens=profile.vlm_tokens)
            runs = [await measure.vlm_once(stub, image, ours) for _ in range(profile.vlm_runs)]
            results["vlm"] = {**measure.summarise_vlm(runs), "runs": runs, "max_new_tokens": profile.vlm_tokens}
            results["vlm_concurrent"] = [await measure.vlm_concurrent(stub, image, ours, n)
                                         for n in profile.vlm_clients if may(f"vlm {n} concurrent")]
        if "audio" in opened and may("audio"):
            stub = audio_pb2_grpc.AudioServiceStub(opened["audio"])
            dpm = common_pb2.AudioSettings(duration_seconds=profile.clip_seconds, num_inference_steps=profile.dpm_steps,
                                           seed=1, scheduler=common_pb2.SCHEDULER_DPM_SOLVER)
            per_clip = {}
            for batch in profile.audio_batches:
                if batch == profile.audio_batches[0] or may(f"audio batch {batch}"):
                    per_clip[str(batch)] = await measure.audio_per_clip(stub, batch, dpm, profile.audio_repeats)
            first = per_clip[str(profile.audio_batches[0])]
            results["audio"] = {"clip_seconds": profile.clip_seconds, "steps": profile.dpm_steps, "scheduler": "dpm",
                                "per_clip_s": per_clip,
                                "realtime_factor": profile.clip_seconds / first if first else None}
        if "orchestrator" in opened and may("e2e"):
            stub = orchestrator_pb2_grpc.OrchestratorStub(opened["orchestrator"])
            decoding = common_pb2.DecodingSettings(max_new_tokens=profile.vlm_tokens)
            audio = common_pb2.AudioSettings(duration_seconds=profile.clip_seconds,
                                             num_inference_steps=profile.dpm_steps, seed=1)
            results["e2e"] = await measure.e2e_image(stub, image, decoding, audio, profile.max_clips)
            if may("throughput"):
                results["throughput"] = await measure.e2e_throughput(stub, image, decoding, audio, profile.max_clips,
                                                                     profile.clients, profile.images_per_client)
        # The seed-style baseline last: a comparison, not a measurement of this design.
        if "vlm" in opened and may("vlm seed sampling"):
            stub = vision_pb2_grpc.VisionServiceStub(opened["vlm"])
            seed = common_pb2.DecodingSettings(max_new_tokens=profile.vlm_tokens, temperature=SEED_TEMPERATURE,
                                               top_p=SEED_TOP_P, seed=1)
            results["vlm_seed_sampling"] = await measure.vlm_once(stub, image, seed)
        if "audio" in opened and may("seed ddim clip"):
            stub = audio_pb2_grpc.AudioServiceStub(opened["audio"])
            ddim = common_pb2.AudioSettings(duration_seconds=profile.clip_seconds,
                                            num_inference_steps=profile.seed_ddim_steps, seed=1,
                                            scheduler=common_pb2.SCHEDULER_DDIM)
            results["seed_audio"] = {"steps": profile.seed_ddim_steps, "scheduler": "ddim",
                                     "clip_s": await measure.audio_clip(stub, measure.CAPTIONS[0], ddim)}
    finally:
        for channel in opened.values():
            await channel.close()
    return results


def seed_baseline(profile: Profile, results: dict) -> dict:
    """The seed's way, per image: its long JSON answer sampled at the seed's settings, then DDIM 200 clips
    one after another. Accounting: prefill + seed_vlm_tokens x the measured sampled ms/token, plus
    clips x the measured DDIM clip time (through the same services)."""
    sampled, ddim, e2e = results["vlm_seed_sampling"], results["seed_audio"], results["e2e"]
    clips = max(SEED_MIN_CLIPS, e2e["clips_done"]) if e2e else SEED_MIN_CLIPS
    vlm_s = (sampled["prefill_s"] + profile.seed_vlm_tokens * sampled["ms_per_token"] / 1000
             if sampled and sampled["ms_per_token"] is not None else None)
    audio_s = clips * ddim["clip_s"] if ddim else None
    per_image = vlm_s + audio_s if vlm_s is not None and audio_s is not None else None
    ours = e2e["per_image_s"] if e2e else None
    return {"vlm_tokens": profile.seed_vlm_tokens, "temperature": SEED_TEMPERATURE, "top_p": SEED_TOP_P,
            "vlm_s": vlm_s, "ddim_steps": profile.seed_ddim_steps, "ddim_clip_s": ddim["clip_s"] if ddim else None,
            "clips_per_image": clips, "per_image_s": per_image,
            "ours_per_image_s": ours, "ratio": per_image / ours if per_image and ours else None}


def run(args: argparse.Namespace) -> dict:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    profile = TINY if args.tiny else FULL
    if args.clients:
        profile = replace(profile, clients=args.clients)
    need_vlm, need_audio = args.what in ("all", "vlm"), args.what in ("all", "audio")
    started = time.perf_counter()
    env = environment(device)
    built = materialise(args, device, need_vlm, need_audio)
    time_left = ((lambda: started + args.deadline_s - time.perf_counter()) if args.deadline_s
                 else (lambda: float("inf")))
    # Without --vlm-model the VLM service builds its random weights on its device (bench/checkpoints.py).
    random_vlm = [] if args.vlm_model else ["--random-weights"]
    vlm_args = random_vlm + shlex.split(args.vlm_args)
    audio_args = default_audio_args(args.tiny) + shlex.split(args.audio_args)
    # Tiny runs share a few CPU cores with other work: with one intra-op thread per service, two OpenMP
    # teams per process don't spin against each other (a 1 s tiny clip took 0.3 s or 13 s at random).
    extra_env = {"OMP_NUM_THREADS": "1"} if args.tiny else {}
    services = BenchServices(vlm_model=built["vlm"], audio_model=built["audio"], device=device,
                             vlm_args=vlm_args, audio_args=audio_args,
                             start_timeout_seconds=max(60.0, min(1500.0, time_left())),
                             extra_env=extra_env)
    try:
        started_services = services.start_services(vlm=need_vlm, audio=need_audio, orchestrator=args.what == "all")
        pids = {name: s.child.process.pid for name, s in started_services.items()}
        serving_paths = services.serving_paths()
        with GpuMemorySampler(pids) as memory:
            results = asyncio.run(measure_all(args, profile, {n: s.address for n, s in started_services.items()},
                                              test_image(profile.image_size), time_left))
        startup = {name: {"port_s": s.port_seconds, "serving_s": s.serving_seconds}
                   for name, s in started_services.items()}
        if "audio" in startup:
            startup["audio"].update(audio_startup_breakdown(services.log_text("audio")))
    finally:
        codes = services.stop()
    engine_vs_generate = None
    eager = None
    if need_vlm and time_left() > 0:  # after the services stop: the same model in this process, step eager
        from bench import engine_compare

        eager = engine_compare.eager_step(built["vlm"], device, test_image(profile.image_size), profile.vlm_tokens,
                                          random_weights=not args.vlm_model)
    elif need_vlm:
        results["skipped"].append("vlm eager step")
    if need_vlm and args.engine_compare and time_left() > 0:  # after the services stop: the same model, here
        from bench import engine_compare

        engine_vs_generate = engine_compare.compare(built["vlm"], device, test_image(profile.image_size),
                                                    profile.vlm_tokens, threads=1 if args.tiny else None,
                                                    random_weights=not args.vlm_model)
    out = {
        "label": args.label, "mode": "tiny" if args.tiny else "full", "what": args.what,
        "environment": env, "profile": asdict(profile),
        "one_gpu_for_both": bool(need_vlm and need_audio and device.startswith("cuda")),
        "service_args": {"vlm": vlm_args, "audio": audio_args},
        "checkpoints": built, "startup": startup, "serving_paths": serving_paths,
        **results,
        "vlm_engine_vs_generate": engine_vs_generate,
        "vlm_eager_step": eager,
        "seed_baseline": seed_baseline(profile, results) if args.what == "all" and results["seed_audio"]
        and results["vlm_seed_sampling"] else None,
        "peak_gpu_memory_mib": {"per_service": memory.peak_mib, "whole_gpu": memory.peak_gpu_mib,
                                "source": "nvidia-smi" if memory.available else None},
        "exit_codes": codes,
        "bench_seconds": time.perf_counter() - started,
    }
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = run(args)
    path = args.json or (str(Path(os.environ["OUT"]) / "bench.json") if os.environ.get("OUT") else None)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(report.table(out))
    if path:
        print(f"JSON: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
