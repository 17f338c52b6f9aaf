"""Grouped-query attention over the engine's row cache, without repeating K/V heads.

Two ways, one switch (``EngineOptions.attention``): "gqa" (below: SDPA over the step's length bucket, the
rows' real lengths as a mask) and "flex" (:func:`row_cache_flex_attention`: FlexAttention with a block
mask made of each row's real length, so a fused kernel reads only the 128-slot blocks a row has filled).

transformers' SDPA path repeats each K/V head ``heads / kv_heads`` times over the whole span whenever a
mask is given (7x for Qwen2.5-VL-7B: ~1.3 GB of extra traffic per step at batch 1), and an explicit mask
is what lets rows of different lengths share a step. Here the query heads that share a K/V head are
folded into the query length instead (``[B, kv_heads, groups * T, dim]``, as gpt-fast and vLLM's decode
kernels group them), so SDPA reads each K/V head once, with the row mask broadcast over the groups. The
K/V tensors are views of the cache (no copy); on CUDA a boolean mask selects the memory-efficient kernel.
"""
from __future__ import annotations

from typing import Any

NAME = "row_cache_gqa"


def row_cache_gqa_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                            scaling: float | None = None, **kwargs):
    """``query [B, H, T, D]``, ``key/value [B, KVH, S, D]``, ``attention_mask`` bool ``[B, 1, T, S]`` ->
    ``[B, T, H, D]`` (the layout transformers' attention functions return)."""
    import torch

    batch, heads, width, dim = query.shape
    kv_heads, span = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    # Query head h uses K/V head h // groups (repeat_kv's order), so [B, KVH, G, T, D] -> [B, KVH, G*T, D].
    q = query.reshape(batch, kv_heads, groups * width, dim)
    mask = None
    if attention_mask is not None:
        mask = attention_mask[:, :, None].expand(batch, 1, groups, width, span).reshape(batch, 1, groups * width, span)
    out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=mask, dropout_p=dropout,
                                                           scale=scaling)
    return out.reshape(batch, heads, width, dim).transpose(1, 2).contiguous(), None


FLEX_NAME = "row_cache_flex"
FLEX_BLOCK = 128  # FlexAttention's block: a row's last block is read partly masked, the ones past it not at all
_flex_kernel: Any = None  # flex_attention, compiled on CUDA (the fused kernel); eager elsewhere (the reference)


def row_block_mask(write, span: int):
    """The block mask of one step: query ``t`` of row ``b`` (at cache slot ``write[b, t]``) sees slots
    ``0 .. write[b, t]``. Per row and query block, the key blocks wholly at or before its first query are
    "full" (no mask evaluated), those up to its last query's block "partial" (masked), the rest skipped: the
    work follows each row's own length, not the span. Tensor ops only (no host read): capturable."""
    import torch
    from torch.nn.attention.flex_attention import BlockMask

    batch, width = write.shape
    q_blocks, kv_blocks = -(-width // FLEX_BLOCK), -(-span // FLEX_BLOCK)
    padded = torch.cat([write, write[:, -1:].expand(batch, q_blocks * FLEX_BLOCK - width)], dim=1)
    per_block = padded.view(batch, q_blocks, FLEX_BLOCK)
    first, last = per_block.amin(-1), per_block.amax(-1)  # [B, q_blocks]
    touched = torch.clamp(last // FLEX_BLOCK + 1, max=kv_blocks)
    full = torch.clamp((first + 1) // FLEX_BLOCK, max=touched)
    blocks = torch.arange(kv_blocks, device=write.device)
    full_indices = blocks.expand(batch, 1, q_blocks, kv_blocks)
    partial_indices = torch.clamp(full[..., None] + blocks, max=kv_blocks - 1)[:, None]

    def visible(b, h, q, kv):
        return kv <= padded[b, q]

    return BlockMask.from_kv_blocks((touched - full)[:, None].to(torch.int32), partial_indices.to(torch.int32),
                                    full[:, None].to(torch.int32), full_indices.to(torch.int32),
                                    BLOCK_SIZE=FLEX_BLOCK, mask_mod=visible, seq_lengths=(width, span),
                                    compute_q_blocks=False)


def row_cache_flex_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
    """A decode step's attention with a :func:`row_block_mask` (GQA in the kernel: K/V heads not repeated).
    Prefill passes a boolean mask instead: it takes the "gqa" path (prompt lengths vary: one compiled
    kernel per length would compile on every new prompt)."""
    from torch.nn.attention.flex_attention import BlockMask

    if not isinstance(attention_mask, BlockMask):
        return row_cache_gqa_attention(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    out = _flex_kernel(query, key, value, block_mask=attention_mask, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def use_row_cache_attention(model, kind: str = "gqa") -> None:
    """Register ``kind``'s function with transformers and make the language model's layers call it (the
    vision tower keeps its own implementation). The engine owns this model: the reference path loads its own."""
    from transformers import AttentionInterface

    name = NAME
    if kind == "flex":
        global _flex_kernel
        import warnings

        import torch
        from torch.nn.attention.flex_attention import flex_attention

        if model.device.type == "cuda":
            _flex_kernel = torch.compile(flex_attention, dynamic=False, fullgraph=True)
        else:  # the unfused reference (correct, not faster): what the CPU tests check the block masks with
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            _flex_kernel = flex_attention
        AttentionInterface.register(FLEX_NAME, row_cache_flex_attention)
        name = FLEX_NAME
    AttentionInterface.register(NAME, row_cache_gqa_attention)
    model.config.text_config._attn_implementation = name
    model.model.language_model.config._attn_implementation = name


SDPA_BACKENDS = ("flash-efficient", "any", "math")


def choose_sdpa_backends(choice: str) -> None:
    """Which kernels torch's scaled_dot_product_attention may pick, process-wide (prefill, the vision tower,
    the "gqa" step). "flash-efficient": FlashAttention and memory-efficient, not cuDNN (on Hopper torch may
    route to cuDNN, which builds a plan per new prompt length and has had intermittent failures with
    masks; the default until a GPU run measures it); "any": torch's own choice, cuDNN included; "math":
    the unfused reference. The math kernel stays allowed in every choice: it is what runs where no fused
    kernel fits (CPU, odd shapes)."""
    import torch

    if choice not in SDPA_BACKENDS:
        raise ValueError(f"sdpa backend must be one of {SDPA_BACKENDS}, got {choice!r}")
    fused = choice != "math"
    torch.backends.cuda.enable_cudnn_sdp(choice == "any")
    torch.backends.cuda.enable_flash_sdp(fused)
    torch.backends.cuda.enable_mem_efficient_sdp(fused)
    torch.backends.cuda.enable_math_sdp(True)
