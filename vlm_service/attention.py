"""Grouped-query attention over the engine's row cache, without repeating K/V heads.

transformers' SDPA path repeats each K/V head ``heads / kv_heads`` times over the whole span whenever a
mask is given (7x for Qwen2.5-VL-7B: ~1.3 GB of extra traffic per step at batch 1), and an explicit mask
is what lets rows of different lengths share a step. Here the query heads that share a K/V head are
folded into the query length instead (``[B, kv_heads, groups * T, dim]``, as gpt-fast and vLLM's decode
kernels group them), so SDPA reads each K/V head once, with the row mask broadcast over the groups. The
K/V tensors are views of the cache (no copy); on CUDA a boolean mask selects the memory-efficient kernel.
"""
from __future__ import annotations

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


def use_row_cache_attention(model) -> None:
    """Register the function with transformers and make the language model's layers call it (the vision
    tower keeps its own implementation). The engine owns this model: the reference path loads its own."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, row_cache_gqa_attention)
    model.config.text_config._attn_implementation = NAME
    model.model.language_model.config._attn_implementation = NAME
