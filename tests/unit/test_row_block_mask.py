"""The FlexAttention block mask of the engine's "flex" attention (vlm_service.attention.row_block_mask): its
blocks follow each row's own length, a "full" block is one the fused kernel may read without the mask, and
attention with it is the masked attention over the whole span."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from vlm_service.attention import FLEX_BLOCK, row_block_mask


@st.composite
def steps(draw):
    """Rows at their own lengths, ``width`` new tokens each (consecutive slots), one of them perhaps a row
    without a token this step (written at the cache's spare end, past the span)."""
    span = FLEX_BLOCK * draw(st.integers(min_value=1, max_value=4))
    width = draw(st.sampled_from([1, 4, 8, 130]))
    rows = draw(st.integers(min_value=1, max_value=3))
    starts = [draw(st.integers(min_value=0, max_value=max(0, span - width))) for _ in range(rows)]
    write = torch.tensor([[s + t for t in range(width)] for s in starts])
    if draw(st.booleans()):
        write[-1] = span + torch.arange(width)  # a padding row: its slots lie past what anyone reads
    return write, span


def _blocks(block_mask, b: int, q: int) -> tuple[set[int], set[int]]:
    partial = block_mask.kv_indices[b, 0, q, : int(block_mask.kv_num_blocks[b, 0, q])].tolist()
    full = block_mask.full_kv_indices[b, 0, q, : int(block_mask.full_kv_num_blocks[b, 0, q])].tolist()
    return set(partial), set(full)


@settings(max_examples=150, deadline=None)
@given(steps())
def test_the_blocks_cover_what_each_row_sees_and_full_blocks_need_no_mask(step):
    write, span = step
    mask = row_block_mask(write, span)
    visible = torch.arange(span)[None, None, :] <= write[:, :, None]  # [B, T, span]
    width = write.shape[1]
    for b in range(write.shape[0]):
        for q in range(-(-width // FLEX_BLOCK)):
            rows = visible[b, q * FLEX_BLOCK : (q + 1) * FLEX_BLOCK]
            partial, full = _blocks(mask, b, q)
            assert not partial & full
            for kv in range(span // FLEX_BLOCK):
                seen = rows[:, kv * FLEX_BLOCK : (kv + 1) * FLEX_BLOCK]
                if seen.any():
                    assert kv in partial | full  # nothing a row sees is skipped
                if kv in full:
                    assert seen.all()  # read without the mask: every query of the block sees all of it
            # The work follows the row: no block past its last written slot.
            last = min(int(write[b, q * FLEX_BLOCK : (q + 1) * FLEX_BLOCK].max()), span - 1)
            assert max(partial | full) <= last // FLEX_BLOCK


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("width, compiled", [(1, False), (8, False), (130, False), (8, True)])
def test_flex_attention_with_it_is_the_masked_attention(width, compiled):
    """Eager flex_attention is the reference implementation; the compiled one is a fused kernel (Inductor's
    CPU template here, Triton on CUDA) that skips the mask in full blocks and the blocks past each row."""
    from torch.nn.attention.flex_attention import flex_attention

    if compiled:
        flex_attention = torch.compile(flex_attention, dynamic=False, fullgraph=True)
    torch.manual_seed(0)
    span, heads, kv_heads, dim = 3 * FLEX_BLOCK, 4, 2, 16
    starts = [0, 37, 200, span - width]
    write = torch.tensor([[s + t for t in range(width)] for s in starts])
    q = torch.randn(len(starts), heads, width, dim)
    k, v = torch.randn(2, len(starts), kv_heads, span, dim)
    got = flex_attention(q, k, v, block_mask=row_block_mask(write, span), enable_gqa=True)
    allowed = (torch.arange(span)[None, None, :] <= write[:, :, None])[:, None]
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5)
