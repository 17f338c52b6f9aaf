"""The audio backend interface: a batch of generation requests in, one result per request out.

A backend owns one model on one device and is not thread-safe: callers (the `Batcher`) run one
`generate` at a time. Implementations: `diffusers_backend.DiffusersAudioBackend` (in-process AudioLDM2, all
model work on one thread of its own) and `triton_backend.TritonAudioBackend` (the model in a Triton
Inference Server). Nothing here imports torch.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from i2s_formats.contract import AudioRequest
from serving.errors import Cancelled, ServiceError

__all__ = ["AudioBackend", "AudioRequest", "AudioResult", "BackendCancelled", "StepCallback", "StopCheck",
           "check_batch", "num_samples"]

StepCallback = Callable[[int, int], None]
StopCheck = Callable[[], bool]


@dataclass(frozen=True, eq=False)
class AudioResult:
    """One generated clip: float32 mono, exactly round(duration_seconds * sample_rate_hertz) samples."""

    waveform: np.ndarray
    sample_rate_hertz: int
    score: float | None  # CLAP text-audio cosine similarity (-1..1) of the clip to its prompt; None if the backend does not score
    steps_run: int
    scheduler: str
    model_id: str
    candidate_index: int = 0  # which of the request's candidates was kept


class NonFiniteAudio(ServiceError):
    """The model produced NaN or infinite samples for a clip (e.g. float16 overflow): the clip fails rather
    than going out as silence. A backend's `generate` returns it in that request's place."""


class BackendCancelled(Cancelled):
    """`should_stop()` turned true and the denoising loop was interrupted after `steps_run` steps."""

    def __init__(self, steps_run: int, total_steps: int | None = None):
        super().__init__(f"generation cancelled after {steps_run} of {total_steps if total_steps is not None else '?'} steps")
        self.steps_run = steps_run
        self.total_steps = total_steps


def num_samples(duration_seconds: float, sample_rate_hertz: int) -> int:
    """The exact clip length in samples for a duration."""
    return int(round(duration_seconds * sample_rate_hertz))


def check_batch(requests: Sequence[AudioRequest],
                key: Callable[[AudioRequest], tuple] = AudioRequest.batch_key) -> None:
    """That the requests (valid by construction: i2s_formats.contract) can share one pipeline call: the same
    ``key`` (by default the request's own; a backend with duration buckets passes its bucketed one)."""
    if not requests:
        raise ValueError("empty batch")
    keys = {key(r) for r in requests}
    if len(keys) > 1:
        raise ValueError(
            "requests in one batch must share duration, steps, guidance, scheduler and num_candidates; got "
            + "; ".join(str(k) for k in sorted(keys, key=str))
        )


class AudioBackend(ABC):
    """One text-to-audio model on one device."""

    # Which UNet serves once warm (serving.fast_path.report: "compiled" or "eager"; "remote" for Triton), and
    # why it is not the one asked for, if it is not.
    serving_path: str = "remote"
    serving_path_reason: str | None = None

    model_id: str
    sample_rate_hertz: int

    @abstractmethod
    def load(self) -> None:
        """Loads the model (blocking; minutes for a download). Idempotent."""

    @property
    @abstractmethod
    def ready(self) -> bool:
        """True once `load()` finished (and the model can generate)."""

    @abstractmethod
    def generate(
        self,
        requests: Sequence[AudioRequest],
        *,
        should_stop: StopCheck | None = None,
        on_step: StepCallback | None = None,
    ) -> list[AudioResult | NonFiniteAudio]:
        """Generates one clip per request, in order, in one model call (a :class:`NonFiniteAudio` in the
        place of a request whose clip came out NaN or infinite).

        All requests must share `batch_key()` (else ValueError). `on_step(done, total)` is called from the
        calling thread after each denoising step; `should_stop()` is polled before the call and after each
        step, and when it returns True the loop ends and BackendCancelled is raised.
        """

    def batch_key(self, request: AudioRequest) -> tuple:
        """Requests with equal keys may share one `generate` call (a backend that buckets durations widens it)."""
        return request.batch_key()

    def warmup(self) -> None:
        """Runs one small generation so the first real request does not pay for lazy initialisation."""
        self.generate([AudioRequest(prompt="warm up", duration_seconds=1.0, num_inference_steps=2, seed=0)])

    def close(self) -> None:
        """Frees the model. The backend is not usable afterwards (until `load()` again)."""
