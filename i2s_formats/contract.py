"""The request contract: every public request message resolved, once, into a typed and validated request.

Each service calls these at its edge (docs/architecture.md "The request contract"): the vision servicer
`scene_request`, the audio servicer `generate_audio`, the orchestrator `image_to_sound` (and `with_defaults`
for a stream's config). What comes out is a frozen dataclass that cannot hold a value out of bounds (its
`__post_init__` checks it), so the batcher, the engine and the backends take it without checking again.
Defaults, bounds and the names of schedulers and encodings are written here and nowhere else.

A bad field raises `serving.errors.InvalidInput` (INVALID_ARGUMENT) with one message, whichever service
the request reaches first. Imports only the messages, serving and i2s_formats: no service.
"""
from __future__ import annotations

import math
import secrets
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from image_to_sound.v1 import common_pb2, orchestrator_pb2 as pb
from i2s_formats import audio_encoding, boxes, loudness, seed_format
from serving import request_log
from serving.errors import InvalidInput
from serving.images import ImageLimits, check_image, decode_image
from serving.priority import BATCH, INTERACTIVE, PRIORITIES

if TYPE_CHECKING:
    from PIL import Image

# -- handling (every request: its priority, and whether it may be answered from a result cache) ----------

PRIORITY_BY_ENUM = {common_pb2.PRIORITY_UNSPECIFIED: INTERACTIVE, common_pb2.PRIORITY_INTERACTIVE: INTERACTIVE,
                    common_pb2.PRIORITY_BATCH: BATCH}
PRIORITY_ENUM = {INTERACTIVE: common_pb2.PRIORITY_INTERACTIVE, BATCH: common_pb2.PRIORITY_BATCH}
PRIORITY_HEADER = "i2s-priority"  # HTTP header / gRPC metadata, for callers that cannot set the field


@dataclass(frozen=True)
class Handling:
    """How a request is served: `priority` (serving.priority: interactive before batch, with aging) and
    `bypass_cache` (run the model even when a cached result exists)."""

    priority: str = INTERACTIVE
    bypass_cache: bool = False

    def __post_init__(self) -> None:
        if self.priority not in PRIORITIES:
            raise InvalidInput(f"priority={self.priority!r} is not one of {', '.join(PRIORITIES)}")


def handling(priority: int, bypass_cache: bool = False, header: str = "", name: str = "priority") -> Handling:
    """The wire's priority enum (`name` says which field, for the message) or, when it is unset, the
    `i2s-priority` header's value; InvalidInput for an unknown value of either."""
    if priority not in PRIORITY_BY_ENUM:
        raise InvalidInput(f"{name}={priority} is not a known priority ({', '.join(PRIORITIES)})")
    if priority == common_pb2.PRIORITY_UNSPECIFIED and header.strip():
        value = header.strip().lower()
        if value not in PRIORITIES:
            raise InvalidInput(f"{PRIORITY_HEADER} header {header.strip()[:40]!r} is not one of "
                               f"{', '.join(PRIORITIES)}")
        return Handling(value, bool(bypass_cache))
    return Handling(PRIORITY_BY_ENUM[priority], bool(bypass_cache))


# -- audio (GenerateAudio, and the audio settings of ImageToSound) -------------------------------------

DEFAULT_DURATION_SECONDS = 4.0  # the seed's --audio_seconds default
DEFAULT_GUIDANCE_SCALE = 3.5  # the seed's --audio_guidance default
DEFAULT_CHUNK_SECONDS = 0.5
MIN_CHUNK_SECONDS, MAX_CHUNK_SECONDS = 0.05, 30.0
MIN_DURATION_SECONDS, MAX_DURATION_SECONDS = 1.0, 300.0
# Up to this length a clip is one model call, as always; a longer one is made in windows of the model's
# native length, each continuing the last (audio_service/long_clips.py). The audio service's
# --max-clip-seconds may lower MAX_DURATION_SECONDS for its deployment.
MAX_SINGLE_WINDOW_SECONDS = 30.0
MIN_LOOP_SECONDS = 2.0  # a shorter loop is mostly its own crossfade
MAX_GUARD_RETRIES = 8  # the speech/music guard's N: each retry is a whole clip again
MIN_STEPS, MAX_STEPS = 1, 1000
# DPM-Solver on AudioLDM2's 1000 training steps: at 999 steps the last update is not finite and at 1000
# diffusers' scheduler indexes past its sigmas (IndexError); it is meant for tens of steps anyway.
MAX_STEPS_BY_SCHEDULER = {"dpm": 500, "ddim": MAX_STEPS}
DEFAULT_STEPS = {"dpm": 20, "ddim": 200}
MIN_GUIDANCE, MAX_GUIDANCE = 0.0, 30.0
MIN_CANDIDATES, MAX_CANDIDATES = 1, 8
MAX_PROMPT_CHARS = 2000
MAX_SEED = 2**63 - 1
MAX_CLIP_ID_CHARS = 128
# Checks the settings of a request whose captions are not yet made (ClipSettings): a prompt that passes.
_PLACEHOLDER_PROMPT = "a placeholder caption"

# The scheduler and encoding names: wire enum <-> the backends' names, converted here only.
SCHEDULERS = ("dpm", "ddim")
SCHEDULER_BY_ENUM = {
    common_pb2.SCHEDULER_UNSPECIFIED: "dpm",
    common_pb2.SCHEDULER_DPM_SOLVER: "dpm",
    common_pb2.SCHEDULER_DDIM: "ddim",
}
SCHEDULER_ENUM = {"dpm": common_pb2.SCHEDULER_DPM_SOLVER, "ddim": common_pb2.SCHEDULER_DDIM}
ENCODINGS = {
    common_pb2.AUDIO_ENCODING_UNSPECIFIED: audio_encoding.PCM16,
    audio_encoding.PCM16: audio_encoding.PCM16,
    audio_encoding.FLOAT32: audio_encoding.FLOAT32,
    audio_encoding.WAV: audio_encoding.WAV,
    audio_encoding.FLAC: audio_encoding.FLAC,
}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class AudioRequest:
    """One clip to generate, valid by construction. `seed` alone decides the noise: same request, same
    seed → same audio."""

    prompt: str
    duration_seconds: float = DEFAULT_DURATION_SECONDS
    num_inference_steps: int = DEFAULT_STEPS["dpm"]
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    seed: int = 0
    negative_prompt: str = ""  # "" = none (the pipeline then uses an empty unconditional prompt)
    num_candidates: int = 1  # generate this many, keep the one CLAP ranks best against the prompt
    scheduler: str = "dpm"  # "dpm" (DPM-Solver++ multistep) | "ddim" (the seed's 200-step setting)
    loop: bool = False  # the clip's end flows into its start (audio_service/loops.py)
    reject_speech_music: int = 0  # the speech/music guard's retries, 0 = off (audio_service/speech_music_guard.py)

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise InvalidInput("prompt must be a non-empty string")
        if len(self.prompt) > MAX_PROMPT_CHARS:
            raise InvalidInput(f"prompt is {len(self.prompt)} characters; at most {MAX_PROMPT_CHARS} are accepted")
        if not isinstance(self.negative_prompt, str):
            raise InvalidInput("negative_prompt must be a string")
        if len(self.negative_prompt) > MAX_PROMPT_CHARS:
            raise InvalidInput(f"negative_prompt is longer than {MAX_PROMPT_CHARS} characters")
        d = self.duration_seconds
        if not _is_number(d) or not MIN_DURATION_SECONDS <= d <= MAX_DURATION_SECONDS:
            raise InvalidInput(f"duration_seconds={d} must be within {MIN_DURATION_SECONDS:g}..{MAX_DURATION_SECONDS:g}")
        s = self.num_inference_steps
        if not _is_int(s) or not MIN_STEPS <= s <= MAX_STEPS:
            raise InvalidInput(f"num_inference_steps={s} must be an integer within {MIN_STEPS}..{MAX_STEPS}")
        g = self.guidance_scale
        if not _is_number(g) or not MIN_GUIDANCE <= g <= MAX_GUIDANCE:
            raise InvalidInput(f"guidance_scale={g} must be a finite number within {MIN_GUIDANCE:g}..{MAX_GUIDANCE:g}")
        n = self.num_candidates
        if not _is_int(n) or not MIN_CANDIDATES <= n <= MAX_CANDIDATES:
            raise InvalidInput(f"num_candidates={n} must be an integer within {MIN_CANDIDATES}..{MAX_CANDIDATES}")
        if not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
            raise InvalidInput(f"seed={self.seed} must be an integer within 0..{MAX_SEED}")
        if self.scheduler not in SCHEDULERS:
            raise InvalidInput(f"scheduler={self.scheduler!r} is not one of {', '.join(SCHEDULERS)}")
        if s > MAX_STEPS_BY_SCHEDULER[self.scheduler]:
            raise InvalidInput(f"num_inference_steps={s}: the {self.scheduler} scheduler takes at most "
                               f"{MAX_STEPS_BY_SCHEDULER[self.scheduler]}")
        if not isinstance(self.loop, bool):
            raise InvalidInput("loop must be true or false")
        if self.loop and d < MIN_LOOP_SECONDS:
            raise InvalidInput(f"loop needs a clip of at least {MIN_LOOP_SECONDS:g} s; duration_seconds={d:g}")
        r = self.reject_speech_music
        if not _is_int(r) or not 0 <= r <= MAX_GUARD_RETRIES:
            raise InvalidInput(f"reject_speech_music={r} must be an integer within 0..{MAX_GUARD_RETRIES}")

    @property
    def windowed(self) -> bool:
        """Made in model windows, each continuing the last (longer than one model call makes)."""
        return self.duration_seconds > MAX_SINGLE_WINDOW_SECONDS

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one pipeline call (same latent shape and loop)."""
        return (
            round(float(self.duration_seconds), 6),
            int(self.num_inference_steps),
            float(self.guidance_scale),
            self.scheduler,
            int(self.num_candidates),
        )


# Output rates: 0 is the model's own; the others are resampled to (soxr).
OUTPUT_RATES = (16000, 44100, 48000)


@dataclass(frozen=True)
class AudioOutput:
    """How a clip goes back on the wire: its encoding, the length of its chunks, its rate (0: the model's)
    and the loudness it is normalised to (None: the model's level)."""

    encoding: int = audio_encoding.PCM16
    chunk_seconds: float = DEFAULT_CHUNK_SECONDS
    sample_rate_hertz: int = 0
    loudness_target_lufs: float | None = None

    def __post_init__(self) -> None:
        if self.sample_rate_hertz and self.sample_rate_hertz not in OUTPUT_RATES:
            raise InvalidInput(f"sample_rate_hertz={self.sample_rate_hertz} is not supported; use 0 (the model's), "
                               + ", ".join(map(str, OUTPUT_RATES)))
        if self.loudness_target_lufs is not None:
            loudness.check_target(self.loudness_target_lufs)


@dataclass(frozen=True)
class AudioCall:
    """A GenerateAudio request, resolved."""

    generation: AudioRequest
    output: AudioOutput
    clip_id: str
    handling: Handling = Handling()
    seeded: bool = False  # the caller chose the seed (a seedless request asks for a new sample: never cached)


@dataclass(frozen=True)
class ClipSettings:
    """The audio settings of a request without its prompt, defaults filled in, valid by construction: what
    the orchestrator resolves once per image and sends, every field set, with each clip's caption.

    Two values are deliberately left to the audio service when the caller sets none: the seed (`None`: each
    clip draws a fresh one there; a draw, not a default, and a seedless request asks for a new sample) and
    the negative prompt (`None`: the audio deployment's `--negative-prompt`, an operator's setting)."""

    duration_seconds: float = DEFAULT_DURATION_SECONDS
    num_inference_steps: int = DEFAULT_STEPS["dpm"]
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    num_candidates: int = 1
    scheduler: str = "dpm"
    seed: int | None = None
    negative_prompt: str | None = None
    loop: bool = False
    reject_speech_music: int = 0

    def __post_init__(self) -> None:
        self.request(_PLACEHOLDER_PROMPT)  # AudioRequest holds the bounds: one place checks them

    def request(self, prompt: str, default_negative_prompt: str = "") -> AudioRequest:
        """The backend's request for one clip (the prompt already cleaned)."""
        return AudioRequest(
            prompt=prompt, duration_seconds=self.duration_seconds, num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale, num_candidates=self.num_candidates, scheduler=self.scheduler,
            seed=secrets.randbits(31) if self.seed is None else self.seed,
            negative_prompt=default_negative_prompt if self.negative_prompt is None else self.negative_prompt,
            loop=self.loop, reject_speech_music=self.reject_speech_music,
        )

    def to_proto(self, output: "AudioOutput") -> common_pb2.AudioSettings:
        """The wire settings with every resolved value set: a model service of another version applies
        none of its own defaults to them."""
        settings = common_pb2.AudioSettings(
            duration_seconds=self.duration_seconds, num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale, num_candidates=self.num_candidates,
            scheduler=SCHEDULER_ENUM[self.scheduler], encoding=output.encoding,
            chunk_duration_seconds=output.chunk_seconds, sample_rate_hertz=output.sample_rate_hertz,
            loop=self.loop, reject_speech_music=self.reject_speech_music,
        )
        if output.loudness_target_lufs is not None:
            settings.loudness_target_lufs = output.loudness_target_lufs
        if self.seed is not None:
            settings.seed = self.seed
        if self.negative_prompt is not None:
            settings.negative_prompt = self.negative_prompt
        return settings


def clip_settings(settings: common_pb2.AudioSettings) -> ClipSettings:
    """Audio settings → ClipSettings, defaults filled in (the one place they are); InvalidInput on nonsense."""
    if settings.scheduler not in SCHEDULER_BY_ENUM:
        raise InvalidInput(f"settings.scheduler={settings.scheduler} is not a known scheduler")
    scheduler = SCHEDULER_BY_ENUM[settings.scheduler]
    try:
        return ClipSettings(
            duration_seconds=settings.duration_seconds or DEFAULT_DURATION_SECONDS,
            num_inference_steps=settings.num_inference_steps or DEFAULT_STEPS[scheduler],
            guidance_scale=settings.guidance_scale if settings.HasField("guidance_scale") else DEFAULT_GUIDANCE_SCALE,
            num_candidates=settings.num_candidates or 1,
            scheduler=scheduler,
            seed=settings.seed if settings.HasField("seed") else None,
            negative_prompt=settings.negative_prompt if settings.HasField("negative_prompt") else None,
            loop=settings.loop, reject_speech_music=settings.reject_speech_music,
        )
    except InvalidInput as exc:
        raise InvalidInput(f"settings: {exc}") from None


def audio_request(prompt: str, settings: common_pb2.AudioSettings, default_negative_prompt: str = "") -> AudioRequest:
    """Audio settings (+ prompt) → the backend's request, defaults filled in; InvalidInput on nonsense."""
    resolved = clip_settings(settings)
    # Control and format characters removed, whitespace collapsed: what is left must say something.
    cleaned = seed_format.clean_text(prompt, max(len(prompt), 1))
    if prompt and not cleaned:
        raise InvalidInput("prompt has no printable characters")
    try:
        return resolved.request(cleaned, default_negative_prompt)
    except InvalidInput as exc:
        raise InvalidInput(f"settings: {exc}") from None


def audio_output(settings: common_pb2.AudioSettings) -> AudioOutput:
    if settings.encoding not in ENCODINGS:
        raise InvalidInput(f"settings.encoding={settings.encoding} is not a known encoding")
    chunk_seconds = settings.chunk_duration_seconds or DEFAULT_CHUNK_SECONDS
    if not (math.isfinite(chunk_seconds) and MIN_CHUNK_SECONDS <= chunk_seconds <= MAX_CHUNK_SECONDS):
        raise InvalidInput(f"settings.chunk_duration_seconds={chunk_seconds} must be within "
                           f"{MIN_CHUNK_SECONDS:g}..{MAX_CHUNK_SECONDS:g}")
    target = settings.loudness_target_lufs if settings.HasField("loudness_target_lufs") else None
    try:
        return AudioOutput(ENCODINGS[settings.encoding], chunk_seconds, settings.sample_rate_hertz, target)
    except InvalidInput as exc:
        raise InvalidInput(f"settings.{exc}") from None


def generate_audio(prompt: str, settings: common_pb2.AudioSettings, clip_id: str = "",
                   default_negative_prompt: str = "", request=None) -> AudioCall:
    """A GenerateAudio request (its prompt, settings and clip id; its priority and cache flag when the
    whole `request` is given) resolved."""
    return AudioCall(
        generation=audio_request(prompt, settings, default_negative_prompt),
        output=audio_output(settings),
        clip_id=seed_format.clean_text(clip_id, MAX_CLIP_ID_CHARS) or uuid.uuid4().hex[:12],  # echoed: bounded
        handling=handling(request.priority, request.bypass_cache) if request is not None else Handling(),
        seeded=settings.HasField("seed"),
    )


# -- vision (DescribeScene, StreamSceneDescription) ----------------------------------------------------

MAX_NEW_TOKENS_LIMIT = 2048
DEFAULT_MAX_NEW_TOKENS = 1024  # the v1 grammar bounds the answer; a real model stops well before (~300-600)
MAX_TEMPERATURE = 2.0


@dataclass(frozen=True)
class DecodingOptions:
    """Decoding settings of one request, valid by construction. ``temperature == 0`` means greedy."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    locate_sources: bool = False  # also ask for each source's box (another prompt line and grammar)

    def __post_init__(self) -> None:
        n = self.max_new_tokens
        if not _is_int(n) or not 1 <= n <= MAX_NEW_TOKENS_LIMIT:
            raise InvalidInput(f"max_new_tokens must be an integer from 1 to {MAX_NEW_TOKENS_LIMIT}, got {n!r}")
        t = self.temperature
        if not _is_number(t) or not 0.0 <= t <= MAX_TEMPERATURE:
            raise InvalidInput(f"temperature must be a finite number from 0 to {MAX_TEMPERATURE:g}, got {t!r}")
        p = self.top_p
        if not _is_number(p) or not 0.0 < p <= 1.0:
            raise InvalidInput(f"top_p must be a finite number in (0, 1], got {p!r}")
        s = self.seed
        if s is not None and (not _is_int(s) or not -(2**63) <= s < 2**63):
            raise InvalidInput(f"seed must be None or a 64-bit integer, got {s!r}")

    def to_proto(self) -> common_pb2.DecodingSettings:
        """The wire settings with every resolved value set (the seed only when there is one)."""
        settings = common_pb2.DecodingSettings(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                               top_p=self.top_p, locate_sources=self.locate_sources)
        if self.seed is not None:
            settings.seed = self.seed
        return settings


def decoding_options(settings: common_pb2.DecodingSettings) -> DecodingOptions:
    """Decoding settings → the engine's options, defaults filled in; InvalidInput on nonsense."""
    try:
        return DecodingOptions(
            max_new_tokens=settings.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
            temperature=settings.temperature if settings.HasField("temperature") else 0.0,
            top_p=settings.top_p if settings.HasField("top_p") else 1.0,
            seed=settings.seed if settings.HasField("seed") else None,
            locate_sources=settings.locate_sources,
        )
    except InvalidInput as exc:
        raise InvalidInput(f"decoding: {exc}") from None


@dataclass(frozen=True)
class SceneRequest:
    """A DescribeScene / StreamSceneDescription request, resolved: the image decoded to RGB within the
    limits (serving.images.ImageLimits: the one aspect-ratio limit included) and the decoding options."""

    image: "Image.Image" = field(repr=False)
    decoding: DecodingOptions
    handling: Handling = Handling()


def scene_request(request, limits: ImageLimits = ImageLimits()) -> SceneRequest:
    """A DescribeSceneRequest or StreamSceneDescriptionRequest resolved; InvalidInput on nonsense."""
    if not request.HasField("image"):
        raise InvalidInput("image is required")
    image = decode_image(request.image.data, request.image.mime_type, limits)
    return SceneRequest(image=image, decoding=decoding_options(request.decoding),
                        handling=handling(request.priority, request.bypass_cache))


# -- orchestrator (ImageToSound, StreamImagesToSound) --------------------------------------------------

MAX_ID_CHARS = 32  # source and variant ids of a hand-made description
MAX_SOURCES = 64
MAX_VARIANTS_PER_SOURCE = 16
_ROLES = set(common_pb2.InstrumentRole.values())


def clean_request_id(raw: str) -> str:
    """The id echoed on every event and used in clip ids and logs: cleaned as every request id is
    (serving.request_log.clean_id); a fresh one when nothing printable is left."""
    return request_log.clean_id(raw) or uuid.uuid4().hex[:12]


def with_defaults(image: pb.ImageToSoundRequest, config: pb.StreamConfig) -> pb.ImageToSoundRequest:
    """A stream's config under the image's own settings (fields the image sets win)."""
    merged = pb.ImageToSoundRequest()
    merged.decoding.CopyFrom(config.decoding)
    merged.audio.CopyFrom(config.audio)
    merged.options.CopyFrom(config.options)
    merged.MergeFrom(image)
    return merged


@dataclass(frozen=True)
class ImageRequest:
    """An ImageToSound request resolved: what the pipeline carries to the model calls, which send exactly
    these values (the model services still check them at their own edge: they are public APIs too)."""

    request_id: str  # cleaned, or made when none was sent
    image: common_pb2.Image | None  # checked from its header; None when a description is given
    description: common_pb2.SceneDescription | None  # cleaned; None when an image is given
    decoding: DecodingOptions
    audio: ClipSettings
    output: AudioOutput
    skip_audio: bool = False
    scene_mix: bool = False
    max_clips: int = 32  # the request's, or the orchestrator's cap
    handling: Handling = Handling()  # the priority and cache flag every model call of the image sends


def image_to_sound(request: pb.ImageToSoundRequest, max_clips_per_image: int,
                   image_limits: ImageLimits = ImageLimits(), priority_header: str = "") -> ImageRequest:
    """The whole orchestrator request resolved before any model is called: what a model service would
    refuse later (a NaN duration after the VLM has spent seconds describing the image) is refused here.
    The image is checked from its header (type, size, aspect ratio, frames), not decoded. The priority is
    the field's, else `priority_header`'s (the `i2s-priority` header)."""
    which = request.WhichOneof("input")
    resolved = handling(request.options.priority, request.options.bypass_cache, priority_header, "options.priority")
    if which is None:
        raise InvalidInput("request needs an image or a description")
    if request.options.max_clips > max_clips_per_image:
        raise InvalidInput(f"options.max_clips={request.options.max_clips}; at most {max_clips_per_image} per image")
    skip_audio = request.options.skip_audio
    # Settings that no clip will use are not held against the request (descriptions only).
    audio, output = (ClipSettings(), AudioOutput()) if skip_audio else (clip_settings(request.audio), audio_output(request.audio))
    image = description = None
    if which == "image":
        check_image(request.image.data, request.image.mime_type, image_limits)
        image = request.image
    else:
        description = clean_description(request.description, need_variants=not skip_audio)
    return ImageRequest(
        request_id=clean_request_id(request.request_id), image=image, description=description,
        decoding=decoding_options(request.decoding), audio=audio, output=output, skip_audio=skip_audio,
        scene_mix=request.options.scene_mix, max_clips=request.options.max_clips or max_clips_per_image,
        handling=resolved,
    )


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
            boxes.check_location(source.location, where)
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
