"""The decode engine's options and their names, written once: the engine checks them, and the service's flags
(vlm_service/config.py) take their defaults and choices from here. Imports nothing heavy, so reading the
flags does not load the engine."""
from __future__ import annotations

from dataclasses import dataclass


JUMP_FORWARD_MODES = ("off", "exact", "retokenize")
CAPTURE_MODES = ("auto", "none", "compile", "cuda-graph")
ATTENTION_MODES = ("gqa", "flex", "model")


@dataclass(frozen=True)
class EngineOptions:
    """How the engine decodes; each fast path has its own switch (the plain path is the reference)."""

    max_batch: int = 8  # rows decoded together (the largest batch bucket)
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8)  # batch sizes a step runs at (captured at warm-up)
    token_buckets: tuple[int, ...] = (1, 8)  # new tokens per row in one step (jump-forward feeds several)
    length_buckets: tuple[int, ...] = (1536, 3072)  # cache slots a step attends over; the last is the row length
    capture: str = "auto"  # auto (cuda-graph on CUDA, none elsewhere) | none | compile | cuda-graph
    jump_forward: str = "exact"  # off | exact | retokenize
    prefix_cache: bool = True  # reuse the KV of the prompt text before the image
    attention: str = "gqa"  # gqa: K/V heads read once, over the length bucket | flex: over each row's length
    #                         (vlm_service.attention) | model: the model's own (repeats K/V)
    prefill_chunk: int = 512  # prompt tokens prefilled per step while others decode (0: the whole prompt at once)
    compile_backend: str | None = None  # torch.compile backend (None: inductor); tests use "eager" on CPU
    self_check: bool = False  # compare the captured step with the eager one at warm-up also off CUDA

    def __post_init__(self) -> None:
        for name in ("batch_buckets", "token_buckets", "length_buckets"):
            buckets = getattr(self, name)
            if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
                raise ValueError(f"{name} must be increasing positive integers, got {buckets!r}")
        if self.batch_buckets[-1] != self.max_batch:
            raise ValueError(f"the largest batch bucket must be max_batch ({self.max_batch})")
        if self.token_buckets[0] != 1:
            raise ValueError("token_buckets must start at 1 (a plain decode step)")
        if self.capture not in CAPTURE_MODES:
            raise ValueError(f"capture must be one of {CAPTURE_MODES}, got {self.capture!r}")
        if self.jump_forward not in JUMP_FORWARD_MODES:
            raise ValueError(f"jump_forward must be one of {JUMP_FORWARD_MODES}, got {self.jump_forward!r}")
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {self.attention!r}")
        if self.prefill_chunk < 0:
            raise ValueError("prefill_chunk must be >= 0")

    @property
    def max_len(self) -> int:
        return self.length_buckets[-1]
