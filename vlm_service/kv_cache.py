"""A static KV cache with one row per request, each row at its own length (for the decode engine).

transformers' ``StaticCache`` keeps one write position for the whole batch, so rows of different lengths
would have to be left-padded and could not join a running batch. Here every row has its own length: a
forward over ``T`` new tokens writes row ``b``'s keys and values at ``lengths[b] .. lengths[b] + T - 1``
and an explicit attention mask lets each query see its own row's valid slots only. All tensors are
allocated once (``[max_batch, kv_heads, max_len, head_dim]`` per layer), so a decode step has fixed
shapes and fixed addresses: what ``torch.compile(mode="reduce-overhead")`` and CUDA graphs need.

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
        return RowCacheView([k[rows, :, :span] for k in self.keys], [v[rows, :, :span] for v in self.values],
                            write_index)


class RowCacheView:
    """The ``past_key_values`` of one forward: writes each row's new keys/values at its own slots."""

    is_compileable = True

    def __init__(self, keys: list, values: list, write_index: Any) -> None:
        import torch

        self.keys, self.values = keys, values
        self.write_index = write_index  # [B, T] long
        batch = write_index.shape[0]
        self._rows = torch.arange(batch, device=write_index.device)[:, None]  # [B, 1]

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        # key_states: [B, heads, T, dim] -> index_put at (row, :, slot): values laid out [B, T, heads, dim].
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k[self._rows, :, self.write_index] = key_states.transpose(1, 2).to(k.dtype)
        v[self._rows, :, self.write_index] = value_states.transpose(1, 2).to(v.dtype)
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:  # positions are always given explicitly
        return 0
