"""The project's one temperature + top-p sampler: all sampled rows of a step at once, a draw per row.

Used by the engine's sampled rows (every row that samples in a step, together) and by the reference
``generate()`` path's logits processor (one row). One softmax, one sort and one top-p cut for all the rows
(temperature and top p per row), then each row's draw from its own seeded ``torch.Generator`` (so a seed
gives the same tokens whatever else is in the batch) by the exponential race, as vLLM samples: the argmax
of ``p / Exp(1)`` picks a token with probability ``p``, with no read from the device.
"""
from __future__ import annotations

from typing import Any, Sequence


class RowSampler:
    """One request's sampling settings and its seeded generator (made on the device of its first draw)."""

    def __init__(self, temperature: float, top_p: float, seed: int) -> None:
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.seed = int(seed)
        self._generator = None

    def generator(self, device: Any):
        import torch

        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        return self._generator


def sample_rows(scores, samplers: Sequence[RowSampler]):
    """``scores [R, V]`` (masked entries -inf), one sampler per row -> the chosen token ids ``[R]`` (on the
    device). A row's tokens depend on its scores and its own generator only."""
    import torch

    device = scores.device
    temperature = torch.tensor([s.temperature for s in samplers], dtype=torch.float32, device=device)
    probs = torch.softmax(scores.float() / temperature[:, None], dim=-1)
    if any(s.top_p < 1.0 for s in samplers):
        # Rows without a cut keep every token: an infinite threshold, not 1.0 (a cumulative sum rounded
        # past 1.0 would cut their last tokens).
        top_p = torch.tensor([s.top_p if s.top_p < 1.0 else float("inf") for s in samplers], device=device)
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        remove = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= top_p[:, None]  # keeps the top token
        probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs.masked_fill(remove, 0.0))
    race = torch.empty_like(probs)
    for i, sampler in enumerate(samplers):
        race[i].exponential_(generator=sampler.generator(device))
    return (probs / race.clamp_min_(1e-30)).argmax(dim=-1)  # clamp: never 0/0


class SeededSamplingLogitsProcessor:
    """The reference path's sampling as a Hugging Face logits processor (batch size 1): draws one token with
    :func:`sample_rows` and leaves only that token finite, so ``generate`` runs greedily
    (``do_sample=False``) with this as the last processor."""

    def __init__(self, temperature: float, top_p: float, seed: int) -> None:
        self.sampler = RowSampler(temperature, top_p, seed)

    def __call__(self, input_ids, scores):
        import torch

        if scores.shape[0] != 1:
            raise ValueError("SeededSamplingLogitsProcessor supports batch size 1")
        if not bool(torch.isfinite(scores).any()):  # nothing allowed: leave it to the other processors
            return scores
        chosen = sample_rows(scores, [self.sampler])
        out = torch.full_like(scores, float("-inf"))
        out[0, chosen[0]] = 0.0
        return out
