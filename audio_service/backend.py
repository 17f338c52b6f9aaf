"""The audio backend interface: a batch of generation requests in, one result per request out.

A backend owns one model on one device and is not thread-safe: callers (the `Batcher`) run one
`generate` at a time. Implementations: `diffusers_backend.DiffusersAudioBackend` (in-process AudioLDM2, all
model work on one thread of its own) and `triton_backend.TritonAudioBackend` (the model in a Triton
Inference Server). Nothing here imports torch.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from serving.errors import Cancelled

SCHEDULERS = ("dpm", "ddim")
MIN_DURATION_SECONDS, MAX_DURATION_SECONDS = 1.0, 30.0
MIN_STEPS, MAX_STEPS = 1, 1000
# DPM-Solver on AudioLDM2's 1000 training steps: at 999 steps the last update is not finite and at 1000
# diffusers' scheduler indexes past its sigmas (IndexError); it is meant for tens of steps anyway.
MAX_STEPS_BY_SCHEDULER = {"dpm": 500, "ddim": MAX_STEPS}
MIN_GUIDANCE, MAX_GUIDANCE = 0.0, 30.0
MIN_CANDIDATES, MAX_CANDIDATES = 1, 8
MAX_PROMPT_CHARS = 2000
MAX_SEED = 2**63 - 1

StepCallback = Callable[[int, int], None]
StopCheck = Callable[[], bool]


@dataclass(frozen=True)
class AudioRequest:
    """One clip to generate. `seed` alone decides the noise: same request, same seed → same audio."""

    prompt: str
    duration_seconds: float = 4.0
    num_inference_steps: int = 20
    guidance_scale: float = 3.5
    seed: int = 0
    negative_prompt: str = ""  # "" = none (the pipeline then uses an empty unconditional prompt)
    num_candidates: int = 1  # generate this many, keep the one CLAP ranks best against the prompt
    scheduler: str = "dpm"  # "dpm" (DPM-Solver++ multistep) | "ddim" (the seed's 200-step setting)

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one pipeline call (same latent shape and loop)."""
        return (
            round(float(self.duration_seconds), 6),
            int(self.num_inference_steps),
            float(self.guidance_scale),
            self.scheduler,
            int(self.num_candidates),
        )


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


class BackendCancelled(Cancelled):
    """`should_stop()` turned true and the denoising loop was interrupted after `steps_run` steps."""

    def __init__(self, steps_run: int, total_steps: int | None = None):
        super().__init__(f"generation cancelled after {steps_run} of {total_steps if total_steps is not None else '?'} steps")
        self.steps_run = steps_run
        self.total_steps = total_steps


def num_samples(duration_seconds: float, sample_rate_hertz: int) -> int:
    """The exact clip length in samples for a duration."""
    return int(round(duration_seconds * sample_rate_hertz))


def validate(request: AudioRequest) -> None:
    """Raises ValueError with a clear message when a request is out of bounds."""
    if not isinstance(request.prompt, str) or not request.prompt.strip():
        raise ValueError("prompt must be a non-empty string")
    if len(request.prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"prompt is {len(request.prompt)} characters; at most {MAX_PROMPT_CHARS} are accepted")
    if not isinstance(request.negative_prompt, str):
        raise ValueError("negative_prompt must be a string")
    if len(request.negative_prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"negative_prompt is longer than {MAX_PROMPT_CHARS} characters")
    d = request.duration_seconds
    if not isinstance(d, (int, float)) or not math.isfinite(d) or not MIN_DURATION_SECONDS <= d <= MAX_DURATION_SECONDS:
        raise ValueError(f"duration_seconds={d} must be within {MIN_DURATION_SECONDS:g}..{MAX_DURATION_SECONDS:g}")
    s = request.num_inference_steps
    if isinstance(s, bool) or not isinstance(s, int) or not MIN_STEPS <= s <= MAX_STEPS:
        raise ValueError(f"num_inference_steps={s} must be an integer within {MIN_STEPS}..{MAX_STEPS}")
    g = request.guidance_scale
    if not isinstance(g, (int, float)) or not math.isfinite(g) or not MIN_GUIDANCE <= g <= MAX_GUIDANCE:
        raise ValueError(f"guidance_scale={g} must be a finite number within {MIN_GUIDANCE:g}..{MAX_GUIDANCE:g}")
    n = request.num_candidates
    if isinstance(n, bool) or not isinstance(n, int) or not MIN_CANDIDATES <= n <= MAX_CANDIDATES:
        raise ValueError(f"num_candidates={n} must be an integer within {MIN_CANDIDATES}..{MAX_CANDIDATES}")
    if isinstance(request.seed, bool) or not isinstance(request.seed, int) or not 0 <= request.seed <= MAX_SEED:
        raise ValueError(f"seed={request.seed} must be an integer within 0..{MAX_SEED}")
    if request.scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler={request.scheduler!r} is not one of {', '.join(SCHEDULERS)}")
    if s > MAX_STEPS_BY_SCHEDULER[request.scheduler]:
        raise ValueError(f"num_inference_steps={s}: the {request.scheduler} scheduler takes at most "
                         f"{MAX_STEPS_BY_SCHEDULER[request.scheduler]}")


def check_batch(requests: Sequence[AudioRequest]) -> None:
    """Validates every request and that they can share one pipeline call (equal `batch_key`)."""
    if not requests:
        raise ValueError("empty batch")
    for r in requests:
        validate(r)
    keys = {r.batch_key() for r in requests}
    if len(keys) > 1:
        raise ValueError(
            "requests in one batch must share duration, steps, guidance, scheduler and num_candidates; got "
            + "; ".join(str(k) for k in sorted(keys, key=str))
        )


class AudioBackend(ABC):
    """One text-to-audio model on one device."""

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
    ) -> list[AudioResult]:
        """Generates one clip per request, in order, in one model call.

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
