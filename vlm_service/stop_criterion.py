"""The reference generate() path's stopping criterion: cancellation and deadlines reach transformers' loop."""

from __future__ import annotations

from typing import Callable


class StopCriterion:
    """Hugging Face stopping criterion: stop as soon as any of the given callables returns True."""

    def __init__(self, *checks: Callable[[], bool] | None) -> None:
        self._checks = [c for c in checks if c is not None]

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        stop = any(check() for check in self._checks)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)
