"""The one sampler (vlm_service.sampling): batched, and per seed the tokens the engine drew before it was
batched (the previous one-row sampler is kept here as the reference), alone and in a batch."""
from __future__ import annotations

import torch

from vlm_service.sampling import RowSampler, SeededSamplingLogitsProcessor, sample_rows


def previous_one_row_sampler(scores, temperature: float, top_p: float, generator):
    """The engine's sampler before this change, one row at a time (what a seed must still give)."""
    probs = torch.softmax(scores[0].float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        remove = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= top_p
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs.masked_fill(remove, 0.0))
    race = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(1e-30)
    return int((probs / race).argmax())


SETTINGS = [(0.8, 0.95, 7), (0.3, 0.8, 1), (1.0, 1.0, 123), (1.5, 0.5, 2**40)]


def _scores(steps: int, rows: int, vocab: int = 4096):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(steps, rows, vocab, generator=g) * 3
    scores[:, :, ::3] = float("-inf")  # a grammar mask
    return scores


def test_a_seed_draws_the_previous_tokens_alone_and_in_a_batch():
    scores = _scores(steps=30, rows=len(SETTINGS))
    for row, (t, p, seed) in enumerate(SETTINGS):
        old = torch.Generator().manual_seed(seed)
        expected = [previous_one_row_sampler(scores[s, row : row + 1], t, p, old) for s in range(30)]
        alone = RowSampler(t, p, seed)
        assert [int(sample_rows(scores[s, row : row + 1], [alone])[0]) for s in range(30)] == expected
    samplers = [RowSampler(t, p, seed) for t, p, seed in SETTINGS]
    together = torch.stack([sample_rows(scores[s], samplers) for s in range(30)])
    for row, (t, p, seed) in enumerate(SETTINGS):
        old = torch.Generator().manual_seed(seed)
        assert together[:, row].tolist() == [previous_one_row_sampler(scores[s, row : row + 1], t, p, old)
                                             for s in range(30)]


def test_draws_only_allowed_tokens_inside_the_nucleus():
    scores = torch.full((2, 10), float("-inf"))
    scores[:, 2], scores[:, 5], scores[:, 7] = 5.0, 4.0, -5.0  # token 7 is outside top p 0.9
    samplers = [RowSampler(1.0, 0.9, seed) for seed in range(2)]
    drawn = {int(t) for _ in range(50) for t in sample_rows(scores, samplers)}
    assert drawn <= {2, 5} and drawn


def test_the_reference_processor_keeps_one_token():
    processor = SeededSamplingLogitsProcessor(0.7, 0.9, 5)
    scores = _scores(1, 1)[0]
    out = processor(None, scores.clone())
    assert torch.isfinite(out).sum() == 1
    assert int(out.argmax()) == int(sample_rows(scores, [RowSampler(0.7, 0.9, 5)])[0])
