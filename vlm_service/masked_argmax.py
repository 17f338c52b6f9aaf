"""Greedy choice under a grammar mask, in numpy, for the engine's CPU path.

The masks are xgrammar's token bitmasks: one row of 32-bit words per request, bit ``t & 31`` of word
``t >> 5`` set where token ``t`` is allowed. The masked argmax is the first index of the largest score
among the allowed tokens (what applying the mask as ``-inf`` and taking ``argmax`` gives). Two kinds of
mask, two ways, row by row (numpy's 1-D scans are several times faster here than its 2-D ones):

- **Sparse** (at most ``sparse_words`` nonzero words: JSON structure, where the grammar allows a handful of
  tokens): only the allowed tokens' indices are built and their scores gathered; the vocabulary is never
  scanned.
- **Dense** (inside a string, where most tokens are allowed): the plain argmax of the row, which is the
  answer when its bit is set; otherwise the whole mask is unpacked.
"""
from __future__ import annotations

import numpy as np

SPARSE_WORDS = 256  # nonzero 32-bit words up to which a mask is read token by token


def masked_argmax(scores: np.ndarray, words: np.ndarray, rows: list[int], vocab_size: int,
                  sparse_words: int = SPARSE_WORDS) -> list[int]:
    """Of ``scores [B, vocab_size]`` float and ``words [B, ceil(vocab_size / 32)]`` (32-bit), the ``rows`` asked
    for (read in place) -> each row's first best allowed token (a row that allows nothing gets its plain
    argmax, as ``-inf`` everywhere does). Bits are read through byte views (little-endian hosts)."""
    wide = words.shape[1] % 2 == 0  # scan 64-bit words: half as many to look at
    return [_row(scores[r], words[r].view(np.uint64 if wide else np.uint32), vocab_size, sparse_words) for r in rows]


def _row(scores: np.ndarray, words: np.ndarray, vocab_size: int, sparse_words: int) -> int:
    bits_per_word = 8 * words.itemsize
    nonzero = np.flatnonzero(words)
    if 0 < len(nonzero) * bits_per_word <= 32 * sparse_words:
        bits = np.flatnonzero(np.unpackbits(words[nonzero].view(np.uint8), bitorder="little"))
        allowed = nonzero[bits // bits_per_word] * bits_per_word + bits % bits_per_word  # ascending
        allowed = allowed[allowed < vocab_size]
        if len(allowed):  # argmax's first maximum is then the lowest such token
            return int(allowed[np.argmax(scores[allowed])])
    token = int(scores.argmax())
    if (int(words[token // bits_per_word]) >> (token % bits_per_word)) & 1:
        return token
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:vocab_size].view(bool)
    return int(np.where(bits, scores, -np.inf).argmax())
