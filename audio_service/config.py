"""The audio service's configuration: one frozen dataclass; flags and I2S_AUDIO_* variables derive from it."""
from __future__ import annotations

import math
from dataclasses import dataclass

from serving.config import parse_config, setting
from serving.priority import PriorityOptions
from serving.result_cache import CacheOptions
from serving.models import DEFAULT_AUDIO_MODEL, DTYPE_NAMES
from serving.server import ServerOptions
from serving.threads import ThreadOptions
from serving.triton_client import TritonTls

DEFAULT_PORT = 50052
# The compile modes and the bucket check, written once: the flags and the backend (a public constructor) use them.
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "aot_eager")


def check_buckets(buckets) -> None:
    """Duration buckets are positive, finite seconds."""
    if any(not math.isfinite(b) or b <= 0 for b in buckets):
        raise ValueError(f"duration buckets must be positive seconds, got {tuple(buckets)!r}")

ENV_PREFIX = "AUDIO"
# What every clip should avoid unless the request says otherwise: AudioLDM2 drifts towards music and voices.
DEFAULT_NEGATIVE_PROMPT = (
    "music, melody, musical instrument, singing, speech, talking, voice, "
    "low quality, distorted, noise, static, muffled"
)


@dataclass(frozen=True)
class AudioConfig:
    model: str = setting(DEFAULT_AUDIO_MODEL, "hub id or local checkpoint dir")
    backend: str = setting("diffusers", "where the model runs: in this process, or in a Triton server",
                           choices=["diffusers", "triton"])
    triton_url: str = setting("localhost:8001", "Triton's gRPC host:port (--backend triton)")
    triton_model: str = setting("audio", "the model's name in Triton's repository (deploy/triton/audio)")
    triton_tls: TritonTls = TritonTls()
    revision: str | None = setting(None, "hub revision (branch, tag or commit)")
    device: str | None = setting(None, "cuda, cuda:1, cpu (default: cuda if available)")
    dtype: str | None = setting(None, "model dtype (default: float16 on GPU, float32 on CPU)", choices=DTYPE_NAMES)
    max_batch_size: int = setting(0, "requests with compatible settings run as one pipeline call, up to this many "
                                  "(0: 8)")
    max_wait_ms: float = setting(10.0, "how long a request waits for companions to batch with")
    max_queue: int = setting(64, "queued requests before RESOURCE_EXHAUSTED")
    default_negative_prompt: str = setting(DEFAULT_NEGATIVE_PROMPT, "negative prompt for requests that set none",
                                           flag="negative-prompt")
    self_check: bool = setting(False, "check the compiled UNet against the eager one before SERVING also off CUDA "
                               "(on CUDA it always runs); a mismatch serves the eager UNet")
    compile: str = setting("none", "torch.compile the UNet; compiled and warmed before SERVING",
                           choices=list(COMPILE_MODES))
    duration_buckets: tuple[float, ...] = setting((), 'seconds, e.g. "4,10,30": requests run at the next bucket and '
                                                  'are trimmed back ("": exact lengths; with --compile: 4,10,30)',
                                                  check=check_buckets)
    prompt_cache_size: int = setting(256, "captions whose encodings are kept (LRU); 0 lets the pipeline encode "
                                     "every batch")
    max_clip_seconds: float = setting(300.0, "the longest clip made (clips over 30 s are made in model windows, "
                                      "each continuing the last); at most 300")
    speech_music_margin: float = setting(0.0, "the speech/music guard refuses a clip whose CLAP score for speech, "
                                         "singing or music is above its caption's score minus this")
    priority: PriorityOptions = PriorityOptions()
    cache: CacheOptions = CacheOptions()
    server: ServerOptions = ServerOptions(port=DEFAULT_PORT)
    threads: ThreadOptions = ThreadOptions()


def parse_args(argv: list[str] | None = None) -> AudioConfig:
    return parse_config(AudioConfig, argv, prefix=ENV_PREFIX, prog="python -m audio_service",
                        description="AudioLDM2 sound-effect generator over gRPC")


COMPILE_DEFAULT_BUCKETS = (4.0, 10.0, 30.0)  # the seed's default clip, the benchmark's 10 s, the longest accepted


def effective_max_batch_size(config: AudioConfig) -> int:
    """`max_batch_size`, or 8 when 0. The same on CPU as on GPU: a batch costs less per clip up to 8 there
    too (tiny AudioLDM2, one thread, 2 s clips, 8 steps: 0.40 / 0.27 / 0.21 s per clip at 1 / 4 / 8)."""
    return config.max_batch_size if config.max_batch_size > 0 else 8


def effective_buckets(config: AudioConfig) -> tuple[float, ...]:
    """The duration buckets; compiled models always get some, so no request shape compiles after SERVING."""
    if config.duration_buckets or config.compile == "none":
        return config.duration_buckets
    return COMPILE_DEFAULT_BUCKETS
