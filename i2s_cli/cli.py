"""The seed's command line (python main.py ...), flag for flag, on top of the gRPC services.

Embedded by default (the three services as local child processes); --orchestrator H:P uses running ones.
Outputs, as the seed wrote them:
    sound_sources/<stem>/<stem>_sound_source.json      the description, in the seed's format
    result/<stem>/NN_<source>_<action>.wav              one clip per variant (PCM 16-bit mono)
    result/<stem>/prompts.json                          what each clip was made from (with its loudness and box)
    result/<stem>/scene_mix.wav, mix.json               with --scene_mix: the stereo mix and the data that rebuild it
    result/index.html                                   the gallery of every image (i2s_cli/gallery.py)
Every file is written atomically; an image whose outputs are complete is skipped on the next run.
With --skip_vlm the input is the descriptions, not the images: every *_sound_source.json under
--sound_sources_dir is rendered, whatever is in --data_dir (as the seed did).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from tqdm.contrib.logging import logging_redirect_tqdm

from image_to_sound.v1 import common_pb2, orchestrator_pb2 as pb
from i2s_client import ImageResult, ImageToSoundClient, OrchestratorUnavailable, make_request, to_image
from i2s_cli.gallery import SpectrogramDrawer, write_gallery
from i2s_cli.phase2 import export_phase2
from serving.atomic_files import write_text_atomic
from serving.errors import InvalidInput
from serving.images import EXTENSIONS
from serving.errors import InvalidInput
from serving.security import SecurityConfigError
from i2s_formats import boxes, contract, json_schemas, loudness, stereo_mix
from i2s_formats.seed_format import SeedFormatError, dumps_seed, read_seed_file

log = logging.getLogger("main")
IMAGE_EXTENSIONS = set(EXTENSIONS)  # what the services accept
DESCRIPTION_SUFFIX = "_sound_source.json"
DEFAULT_VLM_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
DEFAULT_AUDIO_MODEL = "cvssp/audioldm2"
STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def image_kinds() -> str:
    return ", ".join(sorted(e[1:] for e in IMAGE_EXTENSIONS))


def orchestrator_address(value: str) -> str:
    """--orchestrator: host:port (a bare port is the commonest slip)."""
    if value.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is a port alone: give host:port, e.g. localhost:{value}")
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r}: give host:port, e.g. localhost:50050")
    return value


def build_parser() -> argparse.ArgumentParser:
    from serving.config import program_name

    p = argparse.ArgumentParser(
        prog=program_name("main.py"), usage="%(prog)s [options]",
        description="Describe the sound sources in each image (Qwen2.5-VL), then make a sound-effect clip for "
        "each (AudioLDM2). By default the three services are started here as child processes on this machine "
        "and stopped at the end; --orchestrator uses services that are already running.",
        epilog="Runs resume: images whose outputs are complete are skipped; run the same command again after an "
        "interruption. Examples: %(prog)s --single data/coffee.png; %(prog)s --skip_audio; "
        "%(prog)s --orchestrator localhost:50050")
    files = p.add_argument_group("input and output")
    files.add_argument("--data_dir", default="data", metavar="DIR",
                       help=f"folder of images, searched recursively ({image_kinds()}; default: data)")
    files.add_argument("--sound_sources_dir", default="sound_sources", metavar="DIR",
                       help="where descriptions are written; with --skip_vlm, where they are read "
                       "(default: sound_sources)")
    files.add_argument("--result_dir", default="result", metavar="DIR", help="where clips are written (default: result)")
    files.add_argument("--single", metavar="PATH",
                       help="process this one image only (with --skip_vlm: its description, found by file name)")
    files.add_argument("--skip_audio", action="store_true", help="write descriptions only")
    files.add_argument("--skip_vlm", action="store_true",
                       help=f"make clips from every *{DESCRIPTION_SUFFIX} under --sound_sources_dir (no images needed)")
    files.add_argument("--overwrite", action="store_true", help="redo images whose outputs already exist")
    files.add_argument("--bypass_cache", action="store_true", help="render afresh even when the services hold a "
                       "result for the same image or caption and seed")
    files.add_argument("--scene_mix", action="store_true", help="also write result/<image>/scene_mix.wav, all clips layered")
    files.add_argument("--export_phase2", metavar="DIR", help="also copy the clips into DIR/guitar, bass, keyboard, drum "
                       "by instrument")
    files.add_argument("--save_log", metavar="FILE", help="also write the log to FILE")
    files.add_argument("--no_progress", action="store_true", help="no progress bars (log lines only)")
    audio = p.add_argument_group("sound")
    audio.add_argument("--audio_seconds", type=float, default=contract.DEFAULT_DURATION_SECONDS, metavar="SECONDS",
                       help=f"clip length, up to {contract.MAX_DURATION_SECONDS:g}; over "
                       f"{contract.MAX_SINGLE_WINDOW_SECONDS:g} the clip is made window after window, each continuing "
                       f"the last (default: {contract.DEFAULT_DURATION_SECONDS:g})")
    audio.add_argument("--loop", action="store_true",
                       help="make every clip a seamless loop (its end flows into its start; the loop points go into "
                       "the WAV's sampler chunk and prompts.json)")
    audio.add_argument("--reject_speech_music", type=retries, default=0, metavar="N",
                       help="remake a clip that sounds more like speech, singing or music than its caption, with a "
                       f"new seed, up to N times (0-{contract.MAX_GUARD_RETRIES}; default: 0, off)")
    audio.add_argument("--audio_steps", type=int, default=0, metavar="N",
                       help="denoising steps: more is slower and cleaner (default: 20; the original script used 200 "
                       "with --audio_scheduler ddim)")
    audio.add_argument("--audio_guidance", type=float, default=contract.DEFAULT_GUIDANCE_SCALE, metavar="SCALE",
                       help=f"how closely the sound follows its caption (default: {contract.DEFAULT_GUIDANCE_SCALE:g})")
    audio.add_argument("--audio_seed", type=int, default=None, metavar="N",
                       help="random seed for every clip, to repeat a run (default: a new one per clip, recorded in "
                       "prompts.json)")
    audio.add_argument("--audio_scheduler", choices=contract.SCHEDULERS, default="dpm",
                       help="denoising method (default: dpm; ddim with 200 steps is the original script's)")
    audio.add_argument("--num_candidates", type=int, default=1, metavar="N",
                       help="clips made per sound; the one that best matches its caption is kept (default: 1)")
    music = p.add_argument_group("material for music (README \"Phase 2\")")
    music.add_argument("--locate_sources", action="store_true",
                       help="also ask where each sound source is in the image (a box, used to place it in the "
                       "stereo scene mix)")
    music.add_argument("--loudness_target", type=loudness_target, default=None, metavar="LUFS",
                       help=f"normalise every clip and the scene mix to this loudness ({loudness.MIN_TARGET_LUFS:g} "
                       f"to {loudness.MAX_TARGET_LUFS:g}; e.g. -23 broadcast, -14 streaming), peaks under "
                       f"{loudness.PEAK_CEILING_DBFS:g} dBFS (default: clips as the model made them, the mix at "
                       f"{loudness.MIX_TARGET_LUFS:g})")
    music.add_argument("--sample_rate", type=int, default=0, choices=(0, *contract.OUTPUT_RATES), metavar="HERTZ",
                       help="output rate: " + ", ".join(map(str, contract.OUTPUT_RATES)) + " (default: the model's, "
                       "16000)")
    models = p.add_argument_group("models and devices (for the services started here)")
    models.add_argument("--vlm_model", default=DEFAULT_VLM_MODEL, metavar="ID_OR_DIR",
                        help=f"image describer: Hugging Face id or local folder (default: {DEFAULT_VLM_MODEL})")
    models.add_argument("--audio_model", default=DEFAULT_AUDIO_MODEL, metavar="ID_OR_DIR",
                        help=f"sound generator: Hugging Face id or local folder (default: {DEFAULT_AUDIO_MODEL})")
    models.add_argument("--device", default=None, metavar="DEVICE",
                        help="cpu, cuda or cuda:1, for both models (default: cuda if there is a GPU, else cpu)")
    models.add_argument("--vlm_device", default=None, metavar="DEVICE", help="device for the image describer only")
    models.add_argument("--audio_device", default=None, metavar="DEVICE", help="device for the sound generator only")
    models.add_argument("--max_new_tokens", type=int, default=0, metavar="N",
                        help="longest description, in tokens (default: the service's)")
    models.add_argument("--torch_threads", type=int, default=0, metavar="N",
                        help="CPU threads per model service (default: this machine's cores divided between them)")
    models.add_argument("--service_logs", metavar="DIR",
                        help="keep the services' logs in DIR (default: kept only when a service fails, in "
                        "service_logs/ beside --result_dir)")
    remote = p.add_argument_group("running services (README \"Phase 2\" and \"Security\")")
    remote.add_argument("--orchestrator", metavar="HOST:PORT", type=orchestrator_address,
                        help="use the orchestrator running there instead of starting the services here")
    remote.add_argument("--wait_seconds", type=float, default=30.0, metavar="SECONDS",
                        help="with --orchestrator: how long to wait for it to be ready (default: 30)")
    remote.add_argument("--tls_ca_file", metavar="PEM", help="CA of the orchestrator's certificate: connect with TLS")
    remote.add_argument("--tls_cert_file", metavar="PEM", help="client certificate, for mutual TLS")
    remote.add_argument("--tls_key_file", metavar="PEM", help="private key of --tls_cert_file")
    remote.add_argument("--token_file", metavar="FILE",
                        help="bearer token to send (first line); or set I2S_AUTH_TOKEN")
    return p


def loudness_target(value: str) -> float:
    """--loudness_target: a number within the contract's range (argparse says what is wrong, then exits 2)."""
    try:
        target = float(value)
        loudness.check_target(target)
    except (ValueError, InvalidInput) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return target


def find_images(data_dir: Path) -> list[Path]:
    """Every jpg, jpeg, png, bmp or webp under data_dir, any case, recursively, sorted."""
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
    mix_level: dict | None = None  # the scene mix's loudness, once mix.json is written
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


def retries(text: str) -> int:
    """--reject_speech_music N: a count of retries, refused by argparse (one line) when out of range."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value <= contract.MAX_GUARD_RETRIES:
        raise argparse.ArgumentTypeError(f"{value} is not within 0..{contract.MAX_GUARD_RETRIES}")
    return value


def settings_from(args: argparse.Namespace) -> pb.StreamConfig:
    audio = common_pb2.AudioSettings(
        duration_seconds=args.audio_seconds,
        num_inference_steps=args.audio_steps,
        guidance_scale=args.audio_guidance,
        num_candidates=args.num_candidates,
        scheduler=contract.SCHEDULER_ENUM[args.audio_scheduler],
        sample_rate_hertz=args.sample_rate,
        loop=args.loop,
        reject_speech_music=args.reject_speech_music,
    )
    if args.audio_seed is not None:
        audio.seed = args.audio_seed
    if args.loudness_target is not None:
        audio.loudness_target_lufs = args.loudness_target
    # One image is someone waiting for it; a folder is throughput work, served after interactive callers.
    priority = contract.INTERACTIVE if args.single else contract.BATCH
    return pb.StreamConfig(
        audio=audio,
        decoding=common_pb2.DecodingSettings(max_new_tokens=args.max_new_tokens, locate_sources=args.locate_sources),
        options=pb.PipelineOptions(skip_audio=args.skip_audio, scene_mix=args.scene_mix,
                                   priority=contract.PRIORITY_ENUM[priority], bypass_cache=args.bypass_cache),
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


MIX_JSON = "mix.json"


def level_of(metadata: common_pb2.ClipMetadata) -> loudness.Level:
    return loudness.Level(metadata.loudness_lufs if metadata.HasField("loudness_lufs") else None,
                          metadata.peak_dbfs if metadata.HasField("peak_dbfs") else None)


def level_fields(metadata: common_pb2.ClipMetadata) -> dict:
    """A clip's loudness as prompts.json records it (float32 in its shortest exact decimal; None: silence)."""
    level = level_of(metadata)
    return {"loudness_lufs": _shortest(level.lufs), "peak_dbfs": _shortest(level.peak_dbfs),
            "loudness_gain_db": _shortest(metadata.loudness_gain_db)}


def _shortest(value: float | None) -> float | None:
    """A ClipMetadata float32 in its shortest exact decimal, as the score is written."""
    return None if value is None else float(np.format_float_positional(np.float32(value)))


class Writer:
    """Turns one image's events into the seed's files as they arrive."""

    def __init__(self, job: Job, args: argparse.Namespace, progress: Progress,
                 spectrograms: SpectrogramDrawer | None = None):
        self.job, self.args, self.progress, self.spectrograms = job, args, progress, spectrograms
        job.result = ImageResult(job.key)

    def handle(self, event: pb.ImageToSoundEvent) -> None:
        job, result = self.job, self.job.result
        result.add(event)
        kind = event.WhichOneof("event")
        if kind == "source" and not self.args.skip_audio:
            self.progress.more_clips(len(event.source.variants))
        elif kind == "description" and not job.from_description:
            write_text_atomic(job.description_file, dumps_seed(event.description) + "\n")
            log.info("%s: described, %d sound source(s) -> %s", job.key, len(event.description.sources),
                     job.description_file)
        elif kind == "clip_done":
            clip = next(c for c in result.clips if c.ref.clip_id == event.clip_done.clip.clip_id)
            path = clip.save(job.result_dir)
            if clip.ref.kind == pb.CLIP_KIND_VARIANT:
                job.clips_written.append(self._manifest_entry(clip, event.clip_done.prompt_style))
                self.progress.clips.update(1)
            elif clip.mix is not None:
                self._write_mix_json(clip)
            clip.payloads.clear()  # written: free the memory
            log.info("%s: clip %s", job.key, path)
            if self.spectrograms is not None:
                self.spectrograms.submit(path)
        elif kind == "clip_failed":
            self.progress.clips.update(1)
            log.error("%s: clip %s failed: %s", job.key, event.clip_failed.clip.file_name, event.clip_failed.message)
        elif kind == "summary":
            if not self.args.skip_audio:
                self._write_manifest()
            job.done = True
            self.progress.images.update(1)
            summary = event.summary
            log.info("%s: done (%d clip(s)%s) in %.1f s", job.key, len(job.clips_written),
                     f", {len(result.failed)} failed" if result.failed else "", summary.total_seconds)
        elif kind == "image_failed":
            job.error = f"{STATUS_NAMES.get(event.image_failed.code, event.image_failed.code)}: {event.image_failed.message}"
            self.progress.images.update(1)
            log.error("%s: FAILED: %s", job.key, job.error)

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
        entry.update(clip_id=clip.ref.clip_id, box=boxes.to_list(clip.location) if clip.location is not None else None,
                     **level_fields(m))
        if variant is not None and variant.HasField("confidence"):
            entry["confidence"] = round(variant.confidence, 3)
        if m.HasField("score"):  # CLAP score, as ClipDone's float32 in its shortest exact decimal
            entry["score"] = _shortest(m.score)
        if m.window_count > 1:  # a long clip: where its windows join (the gallery marks them)
            entry["windows"] = m.window_count
            entry["window_join_samples"] = list(m.window_join_samples)
        if m.HasField("loop_end_sample"):
            entry["loop_samples"] = [m.loop_start_sample, m.loop_end_sample]
        if m.guard_attempts:  # every try of the speech/music guard, the kept one last
            entry["guard_attempts"] = [
                {"seed": a.seed, "rejected": a.rejected, **{k: round(getattr(a, f"{k}_score"), 4)
                                                            for k in ("caption", "speech", "singing", "music")}}
                for a in m.guard_attempts]
        return entry

    def _write_mix_json(self, clip) -> None:
        """mix.json beside scene_mix.wav: the data that rebuild it, checked against its schema first."""
        job = self.job
        locations = {c.ref.clip_id: c.location for c in job.result.clips}
        document = stereo_mix.to_json(clip.mix, clip.file_name, level_of(clip.metadata), locations)
        json_schemas.validate(document, json_schemas.MIX)
        write_text_atomic(job.result_dir / MIX_JSON, json.dumps(document, indent=2) + "\n")
        job.mix_level = level_fields(clip.metadata)

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
            if (job.result_dir / MIX_JSON).exists():
                manifest["scene_mix_data"] = MIX_JSON
                manifest["scene_mix_level"] = job.mix_level
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
    """Streams the jobs through the orchestrator at `target`, writing each image's files as its events come.
    Raises OrchestratorUnavailable when --orchestrator names one that is not there or not ready."""
    todo = [j for j in jobs if not j.skip_reason and not j.error]
    bars = not args.no_progress and sys.stderr.isatty()
    progress = Progress(len(todo), audio=not args.skip_audio, enabled=bars)
    spectrograms = None if args.skip_audio else SpectrogramDrawer()  # for the gallery, drawn as clips come
    writers = {job.key: Writer(job, args, progress, spectrograms) for job in todo}
    try:
        # The embedded services listen on loopback in plaintext; the flags are for --orchestrator.
        secure = dict(tls_ca_file=args.tls_ca_file, tls_cert_file=args.tls_cert_file, tls_key_file=args.tls_key_file,
                      token_file=args.token_file, token=os.environ.get("I2S_AUTH_TOKEN")) if args.orchestrator else {}
        # With bars, log lines go above them instead of through them.
        with ImageToSoundClient(target, **secure) as client, \
                (logging_redirect_tqdm() if bars else contextlib.nullcontext()):
            if args.orchestrator:
                wait_for_orchestrator(client, args)
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
        if spectrograms is not None:
            spectrograms.close()


def wait_for_orchestrator(client: ImageToSoundClient, args: argparse.Namespace) -> None:
    """Ready at once as a rule; otherwise say what we wait for, so the wait is not silence."""
    first = min(1.0, args.wait_seconds)
    try:
        client.wait_for_ready(timeout=first)
    except OrchestratorUnavailable:
        if args.wait_seconds <= first:
            raise
        log.info("waiting up to %.0f s for the orchestrator at %s to be ready", args.wait_seconds, args.orchestrator)
        client.wait_for_ready(timeout=args.wait_seconds - first)


def report(jobs: list[Job], elapsed: float, args: argparse.Namespace, interrupted: bool = False) -> int:
    failed = [j for j in jobs if j.error or (j.result and j.result.failed)]
    skipped = [j for j in jobs if j.skip_reason]
    unfinished = [j for j in jobs if j.result is not None and not j.done and not j.error] if interrupted else []
    clips = sum(len(j.clips_written) for j in jobs)
    clip_failures = sum(len(j.result.failed) for j in jobs if j.result)
    for job in failed:
        log.error("FAILED %s: %s", job.key, job.error or f"{len(job.result.failed)} clip(s) failed")
    log.info(
        "%d %s: %d done, %d skipped (already complete), %d failed%s; %d clip(s) written, %d failed; %.1f s",
        len(jobs), "description(s)" if args.skip_vlm else "image(s)",
        len(jobs) - len(failed) - len(skipped) - len(unfinished), len(skipped), len(failed),
        f", {len(unfinished)} not finished" if interrupted else "", clips, clip_failures, elapsed,
    )
    read = [j.key for j in jobs if j.description_read]
    if read:
        log.info("%d description file(s) read: %s", len(read), ", ".join(read))
    log.info("descriptions in %s/, clips in %s/", args.sound_sources_dir, args.result_dir)
    if interrupted:
        log.warning("interrupted: what finished is kept; run the same command again to resume")
        return 130
    return 1 if failed else 0


def setup_logging(save_log: str | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if save_log:
        Path(save_log).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(save_log, encoding="utf-8"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", handlers=handlers, force=True)


def check_inputs(args: argparse.Namespace) -> str:
    """What is wrong with the inputs named on the command line, in one line ("" if nothing)."""
    if args.skip_audio and args.skip_vlm:
        return "--skip_audio and --skip_vlm together leave nothing to do"
    if not args.skip_audio:  # the sound settings, checked by the contract the services use, before any work
        try:
            contract.clip_settings(settings_from(args).audio)
        except InvalidInput as exc:
            return f"sound {exc}"
    if args.skip_vlm:  # the descriptions are the input: no image is needed, --single only names one
        if not Path(args.sound_sources_dir).is_dir():
            return f"--skip_vlm: --sound_sources_dir {args.sound_sources_dir}: no such folder"
    elif args.single and not Path(args.single).is_file():
        return f"--single {args.single}: no such file"
    elif not args.single and not Path(args.data_dir).is_dir():
        return f"--data_dir {args.data_dir}: no such folder"
    elif not args.single and not find_images(Path(args.data_dir)):
        return f"no images ({image_kinds()}) found under {args.data_dir}/: put some there, or pass --data_dir DIR"
    return ""


UNRECORDED = (None, 0, 0.0, "SCHEDULER_UNSPECIFIED")


def warn_changed_settings(jobs: list[Job], args: argparse.Namespace) -> None:
    """Images kept from an earlier run whose clips were made with other audio settings: say so once, since
    skipping them silently looks as if the new settings had been applied."""
    if args.skip_audio:
        return
    wanted = {"duration_seconds": round(args.audio_seconds, 3), "guidance": round(args.audio_guidance, 3),
              "scheduler": common_pb2.Scheduler.Name(contract.SCHEDULER_ENUM[args.audio_scheduler])}
    if args.audio_steps:
        wanted["steps"] = args.audio_steps
    if args.audio_seed is not None:
        wanted["seed"] = args.audio_seed
    if args.sample_rate:
        wanted["sample_rate_hertz"] = args.sample_rate
    changed: dict[str, set] = {}
    count = 0
    for job in jobs:
        if not job.skip_reason:
            continue
        try:
            clips = json.loads((job.result_dir / "prompts.json").read_text())["clips"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        # A value the service did not record (0, unspecified) cannot be said to differ.
        differ = {k for clip in clips for k, v in wanted.items() if clip.get(k) not in UNRECORDED and clip[k] != v}
        for key in differ:
            changed.setdefault(key, set()).update(clip.get(key) for clip in clips)
        count += bool(differ)
    if count:
        what = "; ".join(f"{k} {', '.join(map(str, sorted(v, key=str)))} (now {wanted[k]})" for k, v in changed.items())
        log.warning("%d image(s) kept from an earlier run with other audio settings (%s): pass --overwrite to "
                    "redo them", count, what)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.save_log)
    problem = check_inputs(args)
    if problem:
        log.error("%s", problem)
        return 2
    started = time.perf_counter()
    jobs = plan(args)
    for job in jobs:
        if job.skip_reason:
            log.info("skip %s (%s)", job.key, job.skip_reason)
    warn_changed_settings(jobs, args)
    interrupted = False
    try:
        code = run(jobs, args)
        if code:
            return code
    except KeyboardInterrupt:
        interrupted = True
    if not args.skip_audio and not interrupted:
        gallery = write_gallery(Path(args.result_dir))  # every image under result/, this run's and earlier ones
        if gallery is not None:
            log.info("gallery: %s", gallery)
    if args.export_phase2 and not interrupted:
        count = export_phase2(Path(args.result_dir), Path(args.export_phase2))
        log.info("exported %d clip(s) for Phase 2 to %s", count, args.export_phase2)
    return report(jobs, time.perf_counter() - started, args, interrupted)


def run(jobs: list[Job], args: argparse.Namespace) -> int:
    """Processes the jobs, starting the services this run needs unless --orchestrator names running ones.
    Returns an exit code when it could not start (the error is logged in one line), else 0."""
    todo = [j for j in jobs if not j.skip_reason and not j.error]
    if not jobs and args.skip_vlm:
        log.warning("nothing to do: no *%s under %s", DESCRIPTION_SUFFIX, args.sound_sources_dir)
        return 0
    if not todo:
        log.info("nothing to do")
        return 0
    if args.orchestrator:
        try:
            process(jobs, args.orchestrator, args)
        except OrchestratorUnavailable as exc:
            log.error("%s (or leave out --orchestrator to start the services here)", exc)
            return 3
        return 0
    from i2s_cli.embedded import EmbeddedServices, ServiceFailed
    from i2s_cli.preflight import ModelUnavailable, check_models
    from serving.startup import StartupError

    # Only the models this run needs: a resumed run whose descriptions all exist starts no VLM.
    vlm_model = args.vlm_model if any(not j.from_description for j in todo) else None
    audio_model = None if args.skip_audio else args.audio_model
    try:
        check_models(vlm_model, audio_model)
    except (ModelUnavailable, StartupError) as exc:
        log.error("%s", exc)
        return 3
    log.info("starting the services (%s) on this machine", ", ".join(
        f"{kind} {model}" for kind, model in (("VLM", vlm_model), ("audio", audio_model)) if model))
    services = EmbeddedServices(vlm_model=vlm_model, audio_model=audio_model, device=args.device,
                                vlm_device=args.vlm_device, audio_device=args.audio_device,
                                torch_threads=args.torch_threads, logs_dir=args.service_logs)
    logs_beside_results = Path(args.result_dir).resolve().parent / "service_logs"
    try:
        try:
            services.start()
        except ServiceFailed as exc:
            log.error("%s (its log: %s/)", exc, services.keep_logs(logs_beside_results))
            return 3
        process(jobs, services.target, args)
    finally:
        codes = services.stop()
        died = {name: code for name, code in codes.items() if code != 0}
        if died:
            where = services.keep_logs(logs_beside_results)
            log.error("service(s) ended badly: %s; their logs: %s/",
                      ", ".join(f"{name} (exit code {code})" for name, code in died.items()), where)
        services.close()
    return 0
