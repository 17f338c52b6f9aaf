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
    backend: str = "diffusers"  # diffusers (in this process) | triton (a Triton server hosts the model)
    triton_url: str = "localhost:8001"  # Triton's gRPC host:port (--backend triton)
    triton_model: str = "audio"  # the model's name in Triton's repository (deploy/triton/audio)
    revision: str | None = None
    device: str | None = None  # None: cuda if available, else cpu
    dtype: str | None = None  # None: fp16 on GPU, fp32 on CPU
    max_batch_size: int = 4
    max_wait_ms: float = 10.0
    max_queue: int = 64
    default_duration_seconds: float = 4.0  # the seed's --audio_seconds default
    default_guidance_scale: float = 3.5  # the seed's --audio_guidance default
    default_chunk_seconds: float = 0.5
    default_negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    server: ServerOptions = ServerOptions(port=DEFAULT_PORT)


def parse_args(argv: list[str] | None = None) -> AudioConfig:
    p = argparse.ArgumentParser(prog="python -m audio_service", description="AudioLDM2 sound-effect generator over gRPC")
    p.add_argument("--model", default=env_default("model", DEFAULT_MODEL), help="hub id or local checkpoint dir")
    p.add_argument("--backend", default=env_default("backend", "diffusers"), choices=["diffusers", "triton"])
    p.add_argument("--triton-url", default=env_default("triton_url", "localhost:8001"), help="Triton gRPC host:port (--backend triton)")
    p.add_argument("--triton-model", default=env_default("triton_model", "audio"), help="model name in Triton (--backend triton)")
    p.add_argument("--revision", default=env_default("revision", None))
    p.add_argument("--device", default=env_default("device", None), help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--dtype", default=env_default("dtype", None), choices=[None, "float16", "bfloat16", "float32"])
    p.add_argument("--max-batch-size", type=int, default=env_default("max_batch_size", 4),
                   help="requests with compatible settings run as one pipeline call, up to this many")
    p.add_argument("--max-wait-ms", type=float, default=env_default("max_wait_ms", 10.0),
                   help="how long a request waits for companions to batch with")
    p.add_argument("--negative-prompt", default=env_default("negative_prompt", DEFAULT_NEGATIVE_PROMPT),
                   help="negative prompt for requests that set none")
    p.add_argument("--max-queue", type=int, default=env_default("max_queue", 64), help="queued requests before RESOURCE_EXHAUSTED")
    add_server_flags(p, DEFAULT_PORT)
    a = p.parse_args(argv)
    return AudioConfig(
        model=a.model, backend=a.backend, triton_url=a.triton_url, triton_model=a.triton_model, revision=a.revision, device=a.device, dtype=a.dtype,
        max_batch_size=a.max_batch_size, max_wait_ms=a.max_wait_ms, max_queue=a.max_queue,
        default_negative_prompt=a.negative_prompt,
        server=server_options(a),
    )
