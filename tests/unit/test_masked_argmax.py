"""The engine's CPU greedy choice under a grammar mask (vlm_service.masked_argmax) picks what the plain path
picks (every disallowed score set to -inf, then the argmax), for masks of every density, ties included."""
from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings, strategies as st

from vlm_service.masked_argmax import masked_argmax


def reference(scores: np.ndarray, words: np.ndarray, vocab_size: int) -> list[int]:
    """The plain path in torch: each token's bit read one by one, -inf where it is clear, argmax (the first
    maximum; all -inf gives 0). (Not xgrammar's CPU kernel: with a vocabulary that is not a multiple of 32
    it writes the -inf of a row's padding bits into the next row.)"""
    token = torch.arange(vocab_size)
    bits = (torch.from_numpy(words.astype(np.int64))[:, token // 32] >> (token % 32)) & 1
    masked = torch.where(bits.bool(), torch.from_numpy(scores), torch.tensor(float("-inf")))
    return masked.argmax(dim=-1).tolist()


@st.composite
def masked_scores(draw):
    vocab_size = draw(st.integers(min_value=1, max_value=700))
    n_words = (vocab_size + 31) // 32
    rows = draw(st.integers(min_value=1, max_value=4))
    seed = draw(st.integers(min_value=0, max_value=2**32 - 1))
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((rows, vocab_size)).astype(np.float32)
    if draw(st.booleans()):
        scores = np.round(scores)  # many ties: the first maximum must win
    words = np.zeros((rows, n_words), dtype=np.int32)
    for r in range(rows):
        density = draw(st.sampled_from(["none", "one", "few", "most", "all"]))
        if density == "all":
            words[r] = -1
        elif density == "most":
            words[r] = rng.integers(-(2**31), 2**31, n_words, dtype=np.int64).astype(np.int32) | 0x7FFF7FFF
        elif density in ("one", "few"):
            allowed = rng.choice(vocab_size, 1 if density == "one" else min(vocab_size, 5), replace=False)
            for token in allowed:
                words[r, token >> 5] |= np.int32(np.uint32(1 << (token & 31)).view(np.int32))
        if draw(st.booleans()):  # xgrammar leaves the bits past the vocabulary set: they must be ignored
            tail = vocab_size % 32
            if tail:
                words[r, -1] |= np.int32(np.uint32((0xFFFFFFFF << tail) & 0xFFFFFFFF).view(np.int32))
    return scores, words, vocab_size


@settings(max_examples=300, deadline=None)
@given(masked_scores(), st.sampled_from([0, 1, 2, 256]))
def test_masked_argmax_equals_the_masked_then_argmax_reference(case, sparse_words):
    scores, words, vocab_size = case
    rows = list(range(scores.shape[0]))
    got = masked_argmax(scores, words, rows, vocab_size, sparse_words=sparse_words)
    want = reference(scores, words, vocab_size)
    assert got == want


def test_only_the_rows_asked_for_are_read():
    scores = np.array([[0.0, 5.0, 1.0], [9.0, 0.0, 0.0], [0.0, 0.0, 3.0]], dtype=np.float32)
    words = np.array([[0b101], [0b111], [0b011]], dtype=np.int32)
    assert masked_argmax(scores, words, [2, 0], 3) == [0, 2]  # a tie goes to the lower token
