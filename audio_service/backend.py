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
from serving.deadline import Deadline
from serving.errors import Cancelled, ServiceError

__all__ = ["AudioBackend", "AudioRequest", "AudioResult", "BackendCancelled", "StepCallback", "StopCheck",
           "Window", "WindowShape", "check_batch", "num_samples"]

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
    latent: np.ndarray | None = None  # a window's final latent (C, frames, bins), float32; None for a plain clip


@dataclass(frozen=True)
class WindowShape:
    """A backend's model window for long clips (audio_service/long_clips.py): its length in latent frames
    and how many audio samples one latent frame decodes to."""

    frames: int
    frame_samples: int
    sample_rate_hertz: int

    @property
    def seconds(self) -> float:
        return self.frames * self.frame_samples / self.sample_rate_hertz


@dataclass(frozen=True, eq=False)
class Window:
    """One window of a long clip, for `generate(..., windows=)`: generated at the backend's window length,
    its first `overlap_frames` latent frames held to `context` (the previous window's final latent there,
    (C, overlap_frames, bins)) at every denoising step; `context` None for the first window."""

    index: int
    overlap_frames: int
    context: np.ndarray | None = None


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
    model_revision: str | None = None  # the loaded weights (serving.models.checkpoint_revision); None: unknown

    def result_identity(self) -> dict | None:
        """What decides a clip besides its request: the model (id and revision) and the settings of this
        backend that change the samples. Part of every result-cache key; None (revision unknown): no caching."""
        if self.model_revision is None:
            return None
        return {"model_id": self.model_id, "revision": self.model_revision}

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
        deadline: Deadline | None = None,
        windows: Sequence[Window | None] | None = None,
    ) -> list[AudioResult | NonFiniteAudio]:
        """Generates one clip per request, in order, in one model call (a :class:`NonFiniteAudio` in the
        place of a request whose clip came out NaN or infinite).

        All requests must share `batch_key()` (else ValueError). `on_step(done, total)` is called from the
        calling thread after each denoising step; `should_stop()` is polled before the call and after each
        step, and when it returns True the loop ends and BackendCancelled is raised. `deadline`: the last
        of the callers' deadlines; a backend that calls out (Triton) bounds its call by it (TimeoutError
        when it passes), one in process is stopped through `should_stop` when its callers leave. `windows`
        (only from a backend with a `window_shape()`): one per request, all set; each result then carries its
        `latent`.
        """

    def window_shape(self) -> WindowShape | None:
        """The model window long clips are made of; None when this backend cannot continue a window."""
        return None

    def batch_key(self, request: AudioRequest) -> tuple:
        """Requests with equal keys may share one `generate` call (a backend that buckets durations widens it)."""
        return request.batch_key()

    def warmup(self) -> None:
        """Runs one small generation so the first real request does not pay for lazy initialisation."""
        self.generate([AudioRequest(prompt="warm up", duration_seconds=1.0, num_inference_steps=2, seed=0)])

    def close(self) -> None:
        """Frees the model. The backend is not usable afterwards (until `load()` again)."""
