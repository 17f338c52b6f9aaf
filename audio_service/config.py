"""The audio service's configuration: one frozen dataclass, from flags and I2S_* environment variables."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from serving.config import add_server_flags, env_default, server_options
from serving.server import ServerOptions

DEFAULT_MODEL = "cvssp/audioldm2"
DEFAULT_PORT = 50052
# What every clip should avoid unless the request says otherwise: AudioLDM2 drifts towards music and voices.
DEFAULT_NEGATIVE_PROMPT = (
    "music, melody, musical instrument, singing, speech, talking, voice, "
    "low quality, distorted, noise, static, muffled"
)


@dataclass(frozen=True)
class AudioConfig:
    model: str = DEFAULT_MODEL
    backend: str = "diffusers"  # diffusers | triton (planned)
    revision: str | None = None
    device: str | None = None  # None: cuda if available, else cpu
    dtype: str | None = None  # None: fp16 on GPU, fp32 on CPU
    max_batch_size: int = 0  # 0: 8 on GPU, 4 on CPU
    max_wait_ms: float = 10.0
    max_queue: int = 64
    default_duration_seconds: float = 4.0  # the seed's --audio_seconds default
    default_guidance_scale: float = 3.5  # the seed's --audio_guidance default
    default_chunk_seconds: float = 0.5
    default_negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    compile: str = "none"  # torch.compile mode of the UNet: none|default|reduce-overhead|max-autotune|aot_eager
    duration_buckets: str = ""  # e.g. "4,10,30": generate at the next bucket, trim back ("": exact; with compile: 4,10,30)
    prompt_cache_size: int = 256  # captions whose encodings are kept (LRU); 0: the pipeline encodes every batch
    server: ServerOptions = ServerOptions(port=DEFAULT_PORT)


def parse_args(argv: list[str] | None = None) -> AudioConfig:
    p = argparse.ArgumentParser(prog="python -m audio_service", description="AudioLDM2 sound-effect generator over gRPC")
    p.add_argument("--model", default=env_default("model", DEFAULT_MODEL), help="hub id or local checkpoint dir")
    p.add_argument("--backend", default=env_default("backend", "diffusers"), choices=["diffusers"])
    p.add_argument("--revision", default=env_default("revision", None))
    p.add_argument("--device", default=env_default("device", None), help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--dtype", default=env_default("dtype", None), choices=[None, "float16", "bfloat16", "float32"])
    p.add_argument("--max-batch-size", type=int, default=env_default("max_batch_size", 0),
                   help="requests with compatible settings run as one pipeline call, up to this many (0: 8 on GPU, 4 on CPU)")
    p.add_argument("--max-wait-ms", type=float, default=env_default("max_wait_ms", 10.0),
                   help="how long a request waits for companions to batch with")
    p.add_argument("--negative-prompt", default=env_default("negative_prompt", DEFAULT_NEGATIVE_PROMPT),
                   help="negative prompt for requests that set none")
    p.add_argument("--max-queue", type=int, default=env_default("max_queue", 64), help="queued requests before RESOURCE_EXHAUSTED")
    p.add_argument("--compile", default=env_default("compile", "none"),
                   choices=["none", "default", "reduce-overhead", "max-autotune", "aot_eager"],
                   help="torch.compile the UNet; compiled and warmed before SERVING")
    p.add_argument("--duration-buckets", default=env_default("duration_buckets", ""),
                   help='seconds, e.g. "4,10,30": requests run at the next bucket and are trimmed back')
    p.add_argument("--prompt-cache-size", type=int, default=env_default("prompt_cache_size", 256),
                   help="captions whose encodings are kept (LRU); 0 lets the pipeline encode every batch")
    add_server_flags(p, DEFAULT_PORT)
    a = p.parse_args(argv)
    return AudioConfig(
        model=a.model, backend=a.backend, revision=a.revision, device=a.device, dtype=a.dtype,
        max_batch_size=a.max_batch_size, max_wait_ms=a.max_wait_ms, max_queue=a.max_queue,
        default_negative_prompt=a.negative_prompt, compile=a.compile, duration_buckets=a.duration_buckets,
        prompt_cache_size=a.prompt_cache_size,
        server=server_options(a),
    )


COMPILE_DEFAULT_BUCKETS = "4,10,30"  # the seed's default clip, the benchmark's 10 s, the longest accepted


def effective_max_batch_size(config: AudioConfig) -> int:
    """`max_batch_size`, or its device default when 0 (8 on GPU, 4 on CPU)."""
    if config.max_batch_size > 0:
        return config.max_batch_size
    device = config.device
    if device is None:
        import torch  # only here: deciding the device default needs it

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return 8 if device.startswith("cuda") else 4


def effective_buckets(config: AudioConfig) -> str:
    """The duration buckets; compiled models always get some, so no request shape compiles after SERVING."""
    if config.duration_buckets or config.compile == "none":
        return config.duration_buckets
    return COMPILE_DEFAULT_BUCKETS
