"""The VLM service's configuration: one frozen dataclass; flags and I2S_VLM_* variables derive from it."""
from __future__ import annotations

from dataclasses import dataclass

from serving.config import parse_config, setting
from serving.priority import PriorityOptions
from serving.result_cache import CacheOptions
from serving.images import ImageLimits
from serving.models import DEFAULT_VLM_MODEL, DTYPE_NAMES
from serving.server import ServerOptions
from serving.threads import ThreadOptions
from serving.triton_client import TritonTls
from vlm_service.engine_options import ATTENTION_MODES, CAPTURE_MODES, JUMP_FORWARD_MODES, EngineOptions


DEFAULT_PORT = 50051


def _starts_at_one(buckets: tuple[int, ...]) -> None:
    if not buckets or buckets[0] != 1:
        raise ValueError("the token buckets start at 1 (a plain decode step)")

ENV_PREFIX = "VLM"


@dataclass(frozen=True)
class VlmConfig:
    model: str = setting(DEFAULT_VLM_MODEL, "hub id or local checkpoint dir")
    backend: str = setting("transformers", "where the model runs: in this process, or in a Triton server",
                           choices=["transformers", "triton"])
    triton_url: str = setting("localhost:8001", "Triton's gRPC host:port (--backend triton)")
    triton_model: str = setting("vlm", "the model's name in Triton's repository (deploy/triton/vlm)")
    triton_tls: TritonTls = TritonTls()
    revision: str | None = setting(None, "hub revision (branch, tag or commit)")
    device: str | None = setting(None, "cuda, cuda:1, cpu (default: cuda if available)")
    dtype: str | None = setting(None, "model dtype (default: bfloat16 on GPU, float32 on CPU)", choices=DTYPE_NAMES)
    prompt_version: str = setting("v1", "prompt and schema version under vlm_prompt/ (v2: sources first)")
    max_pixels: int | None = setting(None, "resize bound for the model (default: the backend's)")
    max_queue: int = setting(16, "requests waiting before RESOURCE_EXHAUSTED")
    # The decode engine (docs/architecture.md "The VLM decode engine"); engine=False decodes with generate(),
    # one request at a time (the reference).
    engine: bool = setting(True, "decode engine: batched steps, static KV cache (false: generate(), the reference)")
    engine_max_batch: int = setting(EngineOptions.max_batch, "requests decoded together; batch buckets are the powers of two up to it "
                                    "(--backend triton: streams sent to Triton at once, its model's own setting)")
    engine_capture: str = setting(EngineOptions.capture, "decode step: auto (CUDA graphs on CUDA, eager elsewhere; eager if "
                                  "capture fails at warm-up), none (eager), torch.compile reduce-overhead, CUDA graphs",
                                  choices=list(CAPTURE_MODES))
    engine_attention: str = setting(EngineOptions.attention, "attention over the row cache: gqa (K/V heads read once, over the "
                                    "length bucket), flex (FlexAttention over each row's own length; compiled on "
                                    "CUDA) or model (transformers' own, repeats K/V)", choices=list(ATTENTION_MODES))
    engine_prefill_chunk: int = setting(EngineOptions.prefill_chunk, "prompt tokens prefilled per step while other requests decode "
                                        "(0: a whole prompt at once, stalling them)")
    engine_jump_forward: str = setting(EngineOptions.jump_forward, "grammar-forced tokens without a model step (retokenize: more, "
                                       "but tokens differ from generate())", choices=list(JUMP_FORWARD_MODES))
    engine_prefix_cache: bool = setting(EngineOptions.prefix_cache, "reuse the KV of the prompt text before the image")
    engine_max_len: int = setting(EngineOptions.length_buckets[-1], "KV slots per request (prompt + output); the step also runs at half of it")
    engine_token_buckets: tuple[int, ...] = setting(EngineOptions.token_buckets, "new tokens per row in one step (comma list, starts at 1)",
                                                    check=_starts_at_one)
    sdpa_backend: str = setting("flash-efficient", "kernels torch's SDPA may use on CUDA: flash-efficient (no cuDNN: "
                                "it plans per prompt length), any (torch's choice, cuDNN included), math",
                                choices=["flash-efficient", "any", "math"])
    self_check: bool = setting(False, "check the captured decode step against the eager one before SERVING also "
                               "off CUDA (on CUDA it always runs); a mismatch serves the eager step")
    random_weights: bool = setting(False, "benchmarks only: --model's architecture with random weights made on the "
                                   "device (its weight files are not read)")
    image_limits: ImageLimits = ImageLimits()
    priority: PriorityOptions = PriorityOptions()
    engine_interactive_rows: int = setting(1, "decode rows batch work leaves free for interactive requests that "
                                           "arrive (outside its aging turn)")
    cache: CacheOptions = CacheOptions()
    server: ServerOptions = ServerOptions(port=DEFAULT_PORT)
    threads: ThreadOptions = ThreadOptions()


def engine_options(config: VlmConfig) -> EngineOptions | None:
    """The decode engine's options from the service flags (None: the reference generate() path)."""
    if not config.engine:
        return None
    batch_buckets = tuple(sorted({min(2**i, config.engine_max_batch) for i in range(config.engine_max_batch.bit_length() + 1)}))
    return EngineOptions(
        max_batch=config.engine_max_batch, batch_buckets=batch_buckets,
        token_buckets=config.engine_token_buckets,
        length_buckets=tuple(sorted({config.engine_max_len // 2, config.engine_max_len})),
        capture=config.engine_capture, jump_forward=config.engine_jump_forward,
        prefix_cache=config.engine_prefix_cache, attention=config.engine_attention,
        prefill_chunk=config.engine_prefill_chunk, self_check=config.self_check)


def parse_args(argv: list[str] | None = None) -> VlmConfig:
    return parse_config(VlmConfig, argv, prefix=ENV_PREFIX, prog="python -m vlm_service",
                        description="Qwen2.5-VL sound-source describer over gRPC")
