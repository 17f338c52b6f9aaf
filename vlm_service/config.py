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
    backend: str = "transformers"  # transformers | triton (planned)
    revision: str | None = None
    device: str | None = None  # None: cuda if available, else cpu
    dtype: str | None = None  # None: bf16 on GPU, fp32 on CPU
    prompt_version: str = "v1"
    max_pixels: int | None = None  # None: the backend's default
    max_queue: int = 16
    # The decode engine (issue 10); engine=False decodes with generate(), one request at a time (the reference).
    engine: bool = True
    engine_max_batch: int = 8  # requests decoded together; batch buckets are the powers of two up to it
    engine_capture: str = "none"  # decode step: none (eager) | compile (torch.compile reduce-overhead) | cuda-graph
    engine_jump_forward: str = "exact"  # grammar-forced tokens without a model step: off | exact | retokenize
    engine_prefix_cache: bool = True  # reuse the KV of the prompt text before the image
    engine_max_len: int = 3072  # KV slots per request (prompt + output); the step also runs at half of it
    engine_token_buckets: str = "1,8"  # new tokens per row in one step (comma list, starts at 1)
    image_limits: ImageLimits = ImageLimits()
    server: ServerOptions = ServerOptions(port=DEFAULT_PORT)


def _bool(value) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("1", "true", "yes", "on"):
        return True
    if str(value).lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def parse_args(argv: list[str] | None = None) -> VlmConfig:
    p = argparse.ArgumentParser(prog="python -m vlm_service", description="Qwen2.5-VL sound-source describer over gRPC")
    p.add_argument("--model", default=env_default("model", DEFAULT_MODEL), help="hub id or local checkpoint dir")
    p.add_argument("--backend", default=env_default("backend", "transformers"), choices=["transformers"])
    p.add_argument("--revision", default=env_default("revision", None), help="hub revision (branch, tag or commit)")
    p.add_argument("--device", default=env_default("device", None), help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--dtype", default=env_default("dtype", None), choices=[None, "bfloat16", "float16", "float32"])
    p.add_argument("--prompt-version", default=env_default("prompt_version", "v1"))
    p.add_argument("--max-pixels", type=int, default=env_default("max_pixels", 0), help="resize bound for the model (0: default)")
    p.add_argument("--max-queue", type=int, default=env_default("max_queue", 16), help="requests waiting before RESOURCE_EXHAUSTED")
    p.add_argument("--engine", type=_bool, default=env_default("engine", True), help="decode engine (false: generate())")
    p.add_argument("--engine-max-batch", type=int, default=env_default("engine_max_batch", 8), help="requests decoded together")
    p.add_argument("--engine-capture", default=env_default("engine_capture", "none"), choices=["none", "compile", "cuda-graph"])
    p.add_argument("--engine-jump-forward", default=env_default("engine_jump_forward", "exact"), choices=["off", "exact", "retokenize"])
    p.add_argument("--engine-prefix-cache", type=_bool, default=env_default("engine_prefix_cache", True))
    p.add_argument("--engine-max-len", type=int, default=env_default("engine_max_len", 3072), help="KV slots per request")
    p.add_argument("--engine-token-buckets", default=env_default("engine_token_buckets", "1,8"))
    add_server_flags(p, DEFAULT_PORT)
    a = p.parse_args(argv)
    return VlmConfig(
        model=a.model, backend=a.backend, revision=a.revision, device=a.device, dtype=a.dtype,
        prompt_version=a.prompt_version, max_pixels=a.max_pixels or None, max_queue=a.max_queue,
        engine=_bool(a.engine), engine_max_batch=a.engine_max_batch, engine_capture=a.engine_capture,
        engine_jump_forward=a.engine_jump_forward, engine_prefix_cache=_bool(a.engine_prefix_cache),
        engine_max_len=a.engine_max_len, engine_token_buckets=a.engine_token_buckets,
        server=server_options(a),
    )
