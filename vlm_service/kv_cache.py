"""A static KV cache with one row per request, each row at its own length (for the decode engine).

transformers' ``StaticCache`` keeps one write position for the whole batch, so rows of different lengths
would have to be left-padded and could not join a running batch. Here every row has its own length: a
forward over ``T`` new tokens writes row ``b``'s keys and values at ``lengths[b] .. lengths[b] + T - 1``
(in place, one ``index_copy_`` per tensor) and an explicit attention mask lets each query see its own row's
valid slots only. All tensors are allocated once (``[max_batch, kv_heads, max_len, head_dim]`` per layer),
so a decode step has fixed shapes and fixed addresses: what ``torch.compile(mode="reduce-overhead")`` and
CUDA graphs need.

A :class:`RowCacheView` is what the model sees during one forward (``past_key_values``): the model's
attention layers call ``update(keys, values, layer_idx)`` and attend over what it returns.
"""
from __future__ import annotations

from typing import Any


class RowKVCache:
    """The backing tensors: keys/values per layer, ``[max_batch, kv_heads, max_len, head_dim]``."""

    def __init__(self, *, layers: int, max_batch: int, kv_heads: int, head_dim: int, max_len: int,
                 dtype: Any, device: Any) -> None:
        import torch

        self.max_batch, self.max_len = max_batch, max_len
        shape = (max_batch, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]

    @classmethod
    def for_model(cls, model: Any, max_batch: int, max_len: int) -> "RowKVCache":
        text = model.config.text_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return cls(layers=text.num_hidden_layers, max_batch=max_batch, kv_heads=text.num_key_value_heads,
                   head_dim=head_dim, max_len=max_len, dtype=model.dtype, device=model.device)

    def view(self, rows: slice, write_index: Any, span: int) -> "RowCacheView":
        """The cache as one forward over ``rows`` sees it: the first ``span`` slots of each row;
        ``write_index`` is ``[rows, T]`` (the slot of each new token, < span). Views share the backing
        tensors' storage, so a captured step writes where the next one reads."""
        return RowCacheView(self, rows, write_index, span)


class RowCacheView:
    """The ``past_key_values`` of one forward: writes each row's new keys/values at its own slots, in place.

    The write is one ``index_copy_`` per tensor into the whole backing tensor seen as ``[rows*heads*len, dim]``
    (flat index ``(row*heads + head)*len + slot``), so no cache slice is copied in or out, also when the
    step is compiled; attention then reads the first ``span`` slots of the rows (a view)."""

    is_compileable = True

    def __init__(self, cache: RowKVCache, rows: slice, write_index: Any, span: int) -> None:
        import torch

        self.cache, self.span = cache, span
        self.rows = rows
        keys = cache.keys[0]
        heads, length = keys.shape[1], keys.shape[2]
        batch = write_index.shape[0]
        row_ids = torch.arange(rows.start, rows.start + batch, device=write_index.device)
        heads_ids = torch.arange(heads, device=write_index.device)
        # [B, heads, T]: where token t of row b, head h goes in the flat view.
        self.flat_index = (((row_ids[:, None] * heads + heads_ids[None, :]) * length)[:, :, None]
                           + write_index[:, None, :]).reshape(-1)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        # key_states: [B, heads, T, dim], in the flat index's order.
        k, v = self.cache.keys[layer_idx], self.cache.values[layer_idx]
        dim = k.shape[-1]
        k.view(-1, dim).index_copy_(0, self.flat_index, key_states.reshape(-1, dim).to(k.dtype))
        v.view(-1, dim).index_copy_(0, self.flat_index, value_states.reshape(-1, dim).to(v.dtype))
        return k[self.rows, :, : self.span], v[self.rows, :, : self.span]

    def get_seq_length(self, layer_idx: int = 0) -> int:  # positions are always given explicitly
        return 0
