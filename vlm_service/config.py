"""The VLM service's configuration: one frozen dataclass, from flags and I2S_* environment variables."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from serving.config import add_server_flags, env_default, server_options
from serving.images import ImageLimits
from serving.server import ServerOptions

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
DEFAULT_PORT = 50051


@dataclass(frozen=True)
class VlmConfig:
    model: str = DEFAULT_MODEL
    backend: str = "transformers"  # transformers (in this process) | triton (a Triton server hosts the model)
    triton_url: str = "localhost:8001"  # Triton's gRPC host:port (--backend triton)
    triton_model: str = "vlm"  # the model's name in Triton's repository (deploy/triton/vlm)
    revision: str | None = None
    device: str | None = None  # None: cuda if available, else cpu
    dtype: str | None = None  # None: bf16 on GPU, fp32 on CPU
    prompt_version: str = "v1"
    max_pixels: int | None = None  # None: the backend's default
    max_queue: int = 16
    image_limits: ImageLimits = ImageLimits()
    server: ServerOptions = ServerOptions(port=DEFAULT_PORT)


def parse_args(argv: list[str] | None = None) -> VlmConfig:
    p = argparse.ArgumentParser(prog="python -m vlm_service", description="Qwen2.5-VL sound-source describer over gRPC")
    p.add_argument("--model", default=env_default("model", DEFAULT_MODEL), help="hub id or local checkpoint dir")
    p.add_argument("--backend", default=env_default("backend", "transformers"), choices=["transformers", "triton"])
    p.add_argument("--triton-url", default=env_default("triton_url", "localhost:8001"), help="Triton gRPC host:port (--backend triton)")
    p.add_argument("--triton-model", default=env_default("triton_model", "vlm"), help="model name in Triton (--backend triton)")
    p.add_argument("--revision", default=env_default("revision", None), help="hub revision (branch, tag or commit)")
    p.add_argument("--device", default=env_default("device", None), help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--dtype", default=env_default("dtype", None), choices=[None, "bfloat16", "float16", "float32"])
    p.add_argument("--prompt-version", default=env_default("prompt_version", "v1"))
    p.add_argument("--max-pixels", type=int, default=env_default("max_pixels", 0), help="resize bound for the model (0: default)")
    p.add_argument("--max-queue", type=int, default=env_default("max_queue", 16), help="requests waiting before RESOURCE_EXHAUSTED")
    add_server_flags(p, DEFAULT_PORT)
    a = p.parse_args(argv)
    return VlmConfig(
        model=a.model, backend=a.backend, triton_url=a.triton_url, triton_model=a.triton_model, revision=a.revision, device=a.device, dtype=a.dtype,
        prompt_version=a.prompt_version, max_pixels=a.max_pixels or None, max_queue=a.max_queue,
        server=server_options(a),
    )
