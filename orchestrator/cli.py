"""The seed's command line (python main.py ...), flag for flag, on top of the gRPC services.

Embedded by default (the three services as local child processes); --orchestrator H:P uses running ones.
Outputs, as the seed wrote them:
    sound_sources/<stem>/<stem>_sound_source.json      the description, in the seed's format
    result/<stem>/NN_<source>_<action>.wav              one clip per variant (PCM 16-bit mono)
    result/<stem>/prompts.json                          what each clip was made from
Every file is written atomically; an image whose outputs are complete is skipped on the next run.
With --skip_vlm the input is the descriptions, not the images: every *_sound_source.json under
--sound_sources_dir is rendered, whatever is in --data_dir (as the seed did).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from image_to_sound.v1 import common_pb2, orchestrator_pb2 as pb
from orchestrator.client import ImageResult, ImageToSoundClient, make_request, to_image
from orchestrator.phase2 import export_phase2
from serving.atomic_files import write_text_atomic
from serving.security import SecurityConfigError
from serving.seed_format import SeedFormatError, dumps_seed, read_seed_file

log = logging.getLogger("main")
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp"}
DESCRIPTION_SUFFIX = "_sound_source.json"
DEFAULT_VLM_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
DEFAULT_AUDIO_MODEL = "cvssp/audioldm2"
STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="main.py", description="Image → sound-source descriptions → sound-effect clips")
    seed = p.add_argument_group("the seed's options")
    seed.add_argument("--data_dir", default="data", help="folder of images, searched recursively")
    seed.add_argument("--sound_sources_dir", default="sound_sources",
                      help="where descriptions are written (with --skip_vlm: read, searched recursively)")
    seed.add_argument("--result_dir", default="result", help="where clips are written")
    seed.add_argument("--single", metavar="PATH",
                      help="process this one image only (with --skip_vlm: its description, found by file stem)")
    seed.add_argument("--skip_audio", action="store_true", help="write descriptions only")
    seed.add_argument("--skip_vlm", action="store_true",
                      help=f"make audio from every *{DESCRIPTION_SUFFIX} under --sound_sources_dir (no images needed)")
    seed.add_argument("--audio_model", default=DEFAULT_AUDIO_MODEL, help="AudioLDM2 hub id or local dir")
    seed.add_argument("--audio_seconds", type=float, default=4.0, help="clip length in seconds")
    seed.add_argument("--audio_steps", type=int, default=0,
                      help="denoising steps (default: 20 with DPM-Solver; the seed used 200 with DDIM)")
    seed.add_argument("--audio_guidance", type=float, default=3.5, help="classifier-free guidance scale")
    seed.add_argument("--audio_seed", type=int, default=None, help="seed for every clip (default: random, recorded)")
    seed.add_argument("--save_log", metavar="FILE", help="also write the log to FILE")
    more = p.add_argument_group("beyond the seed")
    more.add_argument("--orchestrator", metavar="H:P", help="use running services instead of starting them")
    more.add_argument("--vlm_model", default=DEFAULT_VLM_MODEL, help="Qwen2.5-VL hub id or local dir")
    more.add_argument("--device", default=None, help="device for both models in embedded mode (cpu, cuda, cuda:1)")
    more.add_argument("--vlm_device", default=None, help="device for the VLM only (e.g. cuda:0)")
    more.add_argument("--audio_device", default=None, help="device for the audio model only (e.g. cuda:1)")
    more.add_argument("--torch_threads", type=int, default=0,
                      help="CPU threads per model service (default 0: the machine's cores divided between them)")
    more.add_argument("--audio_scheduler", choices=["dpm", "ddim"], default="dpm", help="ddim + 200 steps is the seed's setting")
    more.add_argument("--num_candidates", type=int, default=1, help="clips generated per variant; the best by CLAP is kept")
    more.add_argument("--max_new_tokens", type=int, default=0, help="VLM output bound (default: the server's)")
    more.add_argument("--scene_mix", action="store_true", help="also write result/<stem>/scene_mix.wav")
    more.add_argument("--export_phase2", metavar="DIR", help="lay the clips out by instrument (guitar/ bass/ keyboard/ drum/)")
    more.add_argument("--overwrite", action="store_true", help="redo images whose outputs already exist")
    more.add_argument("--no_progress", action="store_true", help="no progress bars")
    secure = p.add_argument_group("security (with --orchestrator; README \"Security\")")
    secure.add_argument("--tls_ca_file", metavar="PEM", help="CA of the orchestrator's certificate: connect with TLS")
    secure.add_argument("--tls_cert_file", metavar="PEM", help="client certificate, for mutual TLS")
    secure.add_argument("--tls_key_file", metavar="PEM", help="private key of --tls_cert_file")
    secure.add_argument("--token_file", metavar="FILE",
                        help="bearer token to send (first line); or set I2S_AUTH_TOKEN")
    return p


def find_images(data_dir: Path) -> list[Path]:
    """Every jpg, jpeg, png or bmp under data_dir, any case, recursively, sorted."""
    return sorted(p for p in data_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def find_descriptions(sound_sources_dir: Path) -> list[Path]:
    """Every *_sound_source.json under sound_sources_dir, recursively, sorted (the --skip_vlm input)."""
    return sorted(p for p in sound_sources_dir.rglob(f"*{DESCRIPTION_SUFFIX}") if p.is_file())


def description_stem(path: Path) -> str:
    """The image stem a description file belongs to: coffee_sound_source.json -> coffee."""
    return path.name[: -len(DESCRIPTION_SUFFIX)] if path.name.endswith(DESCRIPTION_SUFFIX) else path.stem


@dataclass
class Job:
    """One image (or, with --skip_vlm, one description) and what this run has to do for it."""

    key: str  # request id and the name in the log: the image or description path as found
    stem: str  # names the output folders
    description_file: Path
    result_dir: Path
    image: Path | None = None  # None with --skip_vlm: the description is the input
    from_description: bool = False
    description_read: bool = False
    skip_reason: str = ""
    error: str = ""
    result: ImageResult | None = None
    clips_written: list[dict] = field(default_factory=list)
    done: bool = False


def audio_complete(result_dir: Path) -> bool:
    """prompts.json exists and lists only clips that exist: the image's audio is done."""
    manifest = result_dir / "prompts.json"
    try:
        clips = json.loads(manifest.read_text())["clips"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all((result_dir / c["file"]).is_file() for c in clips)


def plan(args: argparse.Namespace) -> list[Job]:
    jobs = plan_descriptions(args) if args.skip_vlm else plan_images(args)
    seen: dict[str, str] = {}
    for job in jobs:
        if job.stem in seen and not job.error:
            job.error = f"same file name stem as {seen[job.stem]}: outputs would collide; rename one"
            job.skip_reason = ""
        seen.setdefault(job.stem, job.key)
    return jobs


def plan_images(args: argparse.Namespace) -> list[Job]:
    """The seed's default: one job per image; an existing description resumes it without the VLM."""
    images = [Path(args.single)] if args.single else find_images(Path(args.data_dir))
    jobs = []
    for image in images:
        stem = image.stem
        job = Job(key=str(image), stem=stem, image=image,
                  description_file=Path(args.sound_sources_dir) / stem / f"{stem}{DESCRIPTION_SUFFIX}",
                  result_dir=Path(args.result_dir) / stem)
        has_description = job.description_file.is_file()
        if args.skip_audio:
            if has_description and not args.overwrite:
                job.skip_reason = "description exists"
        elif has_description and not args.overwrite:
            if audio_complete(job.result_dir):
                job.skip_reason = "description and clips exist"
            else:
                job.from_description = True  # resume: the VLM part is done
        jobs.append(job)
    return jobs


def plan_descriptions(args: argparse.Namespace) -> list[Job]:
    """--skip_vlm: one job per description file found; --single keeps the one whose stem matches."""
    root = Path(args.sound_sources_dir)
    files = find_descriptions(root)
    if args.single:
        wanted = description_stem(Path(args.single))
        files = [f for f in files if description_stem(f) == wanted]
        if not files:
            return [Job(key=args.single, stem=wanted, description_file=root / wanted / f"{wanted}{DESCRIPTION_SUFFIX}",
                        result_dir=Path(args.result_dir) / wanted,
                        error=f"--skip_vlm: no {wanted}{DESCRIPTION_SUFFIX} under {root}")]
    jobs = []
    for file in files:
        stem = description_stem(file)
        job = Job(key=str(file), stem=stem, description_file=file, result_dir=Path(args.result_dir) / stem,
                  from_description=True)
        if audio_complete(job.result_dir) and not args.overwrite:
            job.skip_reason = "clips exist"
        jobs.append(job)
    return jobs


def settings_from(args: argparse.Namespace) -> pb.StreamConfig:
    audio = common_pb2.AudioSettings(
        duration_seconds=args.audio_seconds,
        num_inference_steps=args.audio_steps,
        guidance_scale=args.audio_guidance,
        num_candidates=args.num_candidates,
        scheduler=common_pb2.SCHEDULER_DDIM if args.audio_scheduler == "ddim" else common_pb2.SCHEDULER_DPM_SOLVER,
    )
    if args.audio_seed is not None:
        audio.seed = args.audio_seed
    return pb.StreamConfig(
        audio=audio,
        decoding=common_pb2.DecodingSettings(max_new_tokens=args.max_new_tokens),
        options=pb.PipelineOptions(skip_audio=args.skip_audio, scene_mix=args.scene_mix),
    )


class Progress:
    """tqdm bars for images and clips (the clip total grows as the VLM finds variants)."""

    def __init__(self, images: int, audio: bool, enabled: bool):
        from tqdm import tqdm

        self.images = tqdm(total=images, desc="images", unit="img", disable=not enabled, position=0)
        self.clips = tqdm(total=0, desc="clips ", unit="clip", disable=not (enabled and audio), position=1)

    def more_clips(self, count: int) -> None:
        self.clips.total += count
        self.clips.refresh()

    def close(self) -> None:
        self.clips.close()
        self.images.close()


class Writer:
    """Turns one image's events into the seed's files as they arrive."""

    def __init__(self, job: Job, args: argparse.Namespace, progress: Progress):
        self.job, self.args, self.progress = job, args, progress
        job.result = ImageResult(job.key)

    def handle(self, event: pb.ImageToSoundEvent) -> None:
        job, result = self.job, self.job.result
        result.add(event)
        kind = event.WhichOneof("event")
        if kind == "source" and not self.args.skip_audio:
            self.progress.more_clips(len(event.source.variants))
        elif kind == "description" and not job.from_description:
            write_text_atomic(job.description_file, dumps_seed(event.description) + "\n")
        elif kind == "clip_done":
            clip = next(c for c in result.clips if c.ref.clip_id == event.clip_done.clip.clip_id)
            clip.save(job.result_dir)
            if clip.ref.kind == pb.CLIP_KIND_VARIANT:
                job.clips_written.append(self._manifest_entry(clip, event.clip_done.prompt_style))
                self.progress.clips.update(1)
            clip.payloads.clear()  # written: free the memory
        elif kind == "clip_failed":
            self.progress.clips.update(1)
            log.error("%s: clip %s failed: %s", job.key, event.clip_failed.clip.file_name, event.clip_failed.message)
        elif kind == "summary":
            if not self.args.skip_audio:
                self._write_manifest()
            job.done = True
            self.progress.images.update(1)
        elif kind == "image_failed":
            job.error = f"{STATUS_NAMES.get(event.image_failed.code, event.image_failed.code)}: {event.image_failed.message}"
            self.progress.images.update(1)

    def _manifest_entry(self, clip, prompt_style: str) -> dict:
        variant = clip.variant
        m = clip.metadata
        entry = {
            "file": clip.file_name, "source": clip.source_name, "action": clip.action,
            "timbre": list(variant.timbre) if variant else [], "instrument": clip.instrument_role,
            "prompt": clip.prompt, "prompt_style": prompt_style, "negative_prompt": m.negative_prompt, "seed": m.seed,
            "steps": m.num_inference_steps, "scheduler": common_pb2.Scheduler.Name(m.scheduler),
            "guidance": round(m.guidance_scale, 3), "duration_seconds": round(m.duration_seconds, 3),
            "sample_rate_hertz": m.sample_rate_hertz, "model": m.model_id,
        }
        if variant is not None and variant.HasField("confidence"):
            entry["confidence"] = round(variant.confidence, 3)
        if m.HasField("score"):
            entry["score"] = round(m.score, 4)
        return entry

    def _write_manifest(self) -> None:
        job, result = self.job, self.job.result
        manifest = {
            "image": str(job.image) if job.image else job.stem, "description": str(job.description_file),
            "scene": result.scene, "mood": result.mood,
            "clips": sorted(job.clips_written, key=lambda c: c["file"]),
            "failed": [{"file": f.clip.file_name, "error": f.message} for f in result.failed],
        }
        if self.args.scene_mix and (job.result_dir / "scene_mix.wav").exists():
            manifest["scene_mix"] = "scene_mix.wav"
        keep = {c["file"] for c in job.clips_written} | {"scene_mix.wav"}
        for stale in [*job.result_dir.glob("*.wav"), *job.result_dir.glob(".*.part")]:
            if stale.name not in keep:  # clips and temp files of an earlier, interrupted run
                stale.unlink()
        # prompts.json last: its presence (with every listed file there) marks the image complete.
        if not result.failed:
            write_text_atomic(job.result_dir / "prompts.json", json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        else:
            write_text_atomic(job.result_dir / "prompts.partial.json", json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")



def requests_for(jobs: list[Job]):
    """Reads images lazily as the stream asks for them; unreadable ones are marked failed."""
    for job in jobs:
        try:
            if job.from_description:
                description = read_seed_file(job.description_file)
                job.description_read = True
                yield make_request(description=description, request_id=job.key)
            else:
                yield make_request(to_image(job.image), request_id=job.key)
        except (OSError, SeedFormatError) as exc:
            job.error = str(exc)


def process(jobs: list[Job], target: str, args: argparse.Namespace) -> None:
    todo = [j for j in jobs if not j.skip_reason and not j.error]
    progress = Progress(len(todo), audio=not args.skip_audio, enabled=not args.no_progress and sys.stderr.isatty())
    writers = {job.key: Writer(job, args, progress) for job in todo}
    try:
        # The embedded services listen on loopback in plaintext; the flags are for --orchestrator.
        secure = dict(tls_ca_file=args.tls_ca_file, tls_cert_file=args.tls_cert_file, tls_key_file=args.tls_key_file,
                      token_file=args.token_file, token=os.environ.get("I2S_AUTH_TOKEN")) if args.orchestrator else {}
        with ImageToSoundClient(target, **secure) as client:
            for event in client.stream_many(requests_for(todo), config=settings_from(args)):
                writers[event.request_id].handle(event)
    except grpc.RpcError as exc:
        for job in todo:
            if not job.done and not job.error:
                job.error = f"stream ended: {exc.code().name}: {exc.details()}"
    except SecurityConfigError as exc:
        for job in todo:
            job.error = f"not started: {exc}"
    finally:
        progress.close()


def report(jobs: list[Job], elapsed: float, args: argparse.Namespace) -> int:
    failed = [j for j in jobs if j.error or (j.result and j.result.failed)]
    skipped = [j for j in jobs if j.skip_reason]
    clips = sum(len(j.clips_written) for j in jobs)
    clip_failures = sum(len(j.result.failed) for j in jobs if j.result)
    for job in failed:
        log.error("FAILED %s: %s", job.key, job.error or f"{len(job.result.failed)} clip(s) failed")
    log.info(
        "%d %s: %d done, %d skipped (already complete), %d failed; %d clip(s) written, %d failed; %.1f s",
        len(jobs), "description(s)" if args.skip_vlm else "image(s)", len(jobs) - len(failed) - len(skipped),
        len(skipped), len(failed), clips, clip_failures, elapsed,
    )
    read = [j.key for j in jobs if j.description_read]
    if read:
        log.info("%d description file(s) read: %s", len(read), ", ".join(read))
    log.info("descriptions in %s/, clips in %s/", args.sound_sources_dir, args.result_dir)
    return 1 if failed else 0


def setup_logging(save_log: str | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if save_log:
        Path(save_log).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(save_log, encoding="utf-8"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", handlers=handlers, force=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.save_log)
    if args.skip_audio and args.skip_vlm:
        log.error("--skip_audio and --skip_vlm together leave nothing to do")
        return 2
    if args.skip_vlm:  # the descriptions are the input: no image is needed, --single only names one
        if not Path(args.sound_sources_dir).is_dir():
            log.error("--skip_vlm: --sound_sources_dir %s: no such folder", args.sound_sources_dir)
            return 2
    elif args.single and not Path(args.single).is_file():
        log.error("--single %s: no such file", args.single)
        return 2
    elif not args.single and not Path(args.data_dir).is_dir():
        log.error("--data_dir %s: no such folder", args.data_dir)
        return 2
    started = time.perf_counter()
    jobs = plan(args)
    for job in jobs:
        if job.skip_reason:
            log.info("skip %s (%s)", job.key, job.skip_reason)
    if not jobs and args.skip_vlm:
        log.warning("nothing to do: no *%s under %s", DESCRIPTION_SUFFIX, args.sound_sources_dir)
    elif not any(not j.skip_reason and not j.error for j in jobs):
        log.info("nothing to do")
    elif args.orchestrator:
        process(jobs, args.orchestrator, args)
    else:
        from orchestrator.embedded import EmbeddedServices, ServiceFailed
        from orchestrator.preflight import ModelUnavailable, check_models

        try:
            check_models(None if args.skip_vlm else args.vlm_model, None if args.skip_audio else args.audio_model)
            log.info("starting the services (VLM %s, audio %s)", args.vlm_model, args.audio_model)
            # Only what this run needs: --skip_vlm starts no VLM, --skip_audio no audio model.
            with EmbeddedServices(vlm_model=None if args.skip_vlm else args.vlm_model,
                                  audio_model=None if args.skip_audio else args.audio_model,
                                  device=args.device, vlm_device=args.vlm_device,
                                  audio_device=args.audio_device, torch_threads=args.torch_threads) as services:
                process(jobs, services.target, args)
        except ModelUnavailable as exc:
            log.error("%s", exc)
            return 3
        except ServiceFailed as exc:
            log.error("a service failed to start: %s", exc)
            return 3
    if args.export_phase2:
        count = export_phase2(Path(args.result_dir), Path(args.export_phase2))
        log.info("exported %d clip(s) for Phase 2 to %s", count, args.export_phase2)
    return report(jobs, time.perf_counter() - started, args)
