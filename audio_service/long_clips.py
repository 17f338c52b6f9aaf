"""Long clips: window after window at the model's native length, each continuing the last, streamed.

AudioLDM2 denoises a whole clip at once and was trained on ~10 s; past that, quality falls. A clip longer
than `contract.MAX_SINGLE_WINDOW_SECONDS` is made of windows of the backend's `window_shape()`:

- Window k covers latent frames [k*stride, k*stride + frames), stride = frames - overlap; window k > 0 is
  denoised with its first `overlap` frames held to window k-1's final latent there, noised to each step's
  level (audio_service/latent_windows.py: in-painting in latent space). The caption and negative prompt
  are the same throughout; window k's noise comes from the request's seed and k (`window_seed`).
- Each window goes through the batcher as its own request, so windows of different long clips (at the same
  step) share a backend call like clips do, and a cancelled or expired caller stops between windows (or
  at the running window's next step: the batcher's should_stop).
- The decoded windows are joined over the overlap with a crossfade (`crossfade`) and the joined audio is
  yielded as soon as it is final: all of a window but its last `overlap` samples, which wait for the next
  window's crossfade. The first audio of a 5-minute clip is out after one window, as a short clip's is.

The plan and the join are pure numpy, tested on their own; `render_windows` needs only a `submit`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable

import numpy as np

from audio_service.backend import AudioRequest, AudioResult, Window, WindowShape

__all__ = ["OVERLAP_FRACTION", "WindowJoiner", "WindowPlan", "crossfade", "render_windows", "window_seed"]

OVERLAP_FRACTION = 0.25  # of a window: 2.56 s of context for cvssp/audioldm2's 10.24 s windows


def window_seed(seed: int, index: int) -> int:
    """Window `index`'s noise seed: the request's own seed for the first window, then one derived from both
    (a different stream from the candidates' `candidate_seed`: the extra word keeps them apart)."""
    if index == 0:
        return seed
    return int(np.random.SeedSequence([seed, 0x77696E, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))


@dataclass(frozen=True)
class WindowPlan:
    """Where the windows of one clip of `total_samples` lie (all windows full length; the last is trimmed)."""

    shape: WindowShape
    total_samples: int
    overlap_frames: int

    @classmethod
    def for_clip(cls, shape: WindowShape, total_samples: int, overlap_fraction: float = OVERLAP_FRACTION) -> "WindowPlan":
        overlap = max(1, min(shape.frames - 1, int(round(shape.frames * overlap_fraction))))
        return cls(shape=shape, total_samples=int(total_samples), overlap_frames=overlap)

    @property
    def window_samples(self) -> int:
        return self.shape.frames * self.shape.frame_samples

    @property
    def overlap_samples(self) -> int:
        return self.overlap_frames * self.shape.frame_samples

    @property
    def stride_samples(self) -> int:
        return self.window_samples - self.overlap_samples

    @property
    def count(self) -> int:
        return 1 + max(0, math.ceil((self.total_samples - self.window_samples) / self.stride_samples))

    @property
    def join_samples(self) -> list[int]:
        """The middle of each crossfade, as a sample offset in the clip (where the gallery marks a join)."""
        return [k * self.stride_samples + self.overlap_samples // 2 for k in range(1, self.count)]


def crossfade(out: np.ndarray, into: np.ndarray) -> np.ndarray:
    """`out` fading into `into` (same length) at constant power for the pair as it is.

    Gains are t and 1 - t, normalised so the expected power stays the power of one signal given the two
    segments' correlation r: for uncorrelated audio that is the constant-power crossfade; for audio that is
    nearly the same (two decodings of one latent over the overlap, r ~ 1) it tends to the equal-gain one,
    where a plain sin/cos fade would swell by up to 3 dB in the middle."""
    out = np.asarray(out, dtype=np.float32)
    into = np.asarray(into, dtype=np.float32)
    n = len(out)
    if n == 0:
        return out.copy()
    denom = float(np.sqrt(np.dot(out, out) * np.dot(into, into)))
    r = float(np.clip(np.dot(out, into) / denom, -1.0, 1.0)) if denom > 0 else 0.0
    r = max(r, 0.0)  # anti-correlated pairs: no boost beyond the constant-power fade
    t = (np.arange(n, dtype=np.float64) + 0.5) / n
    g_in, g_out = t, 1.0 - t
    norm = np.sqrt(g_in**2 + g_out**2 + 2.0 * r * g_in * g_out)
    return (out * (g_out / norm) + into * (g_in / norm)).astype(np.float32)


class WindowJoiner:
    """Joins decoded windows in order; `add` returns the samples that are final, `finish` the rest. The
    pieces together are exactly `plan.total_samples` long."""

    def __init__(self, plan: WindowPlan):
        self.plan = plan
        self._held: np.ndarray | None = None  # the last window's overlap tail, waiting for the next window
        self._emitted = 0
        self.windows = 0

    def _bounded(self, piece: np.ndarray) -> np.ndarray:
        piece = piece[: max(0, self.plan.total_samples - self._emitted)]
        self._emitted += len(piece)
        return piece

    def add(self, window: np.ndarray) -> np.ndarray:
        plan = self.plan
        if len(window) != plan.window_samples:
            raise ValueError(f"a window of {len(window)} samples; the plan's are {plan.window_samples}")
        ov = plan.overlap_samples
        body = window[: plan.window_samples - ov]
        if self._held is not None:
            body = np.concatenate([crossfade(self._held, window[:ov]), window[ov : plan.window_samples - ov]])
        self._held = np.asarray(window[plan.window_samples - ov :], dtype=np.float32)
        self.windows += 1
        return self._bounded(np.asarray(body, dtype=np.float32))

    def finish(self) -> np.ndarray:
        held, self._held = self._held, None
        return self._bounded(held if held is not None else np.zeros(0, np.float32))


Submit = Callable[[AudioRequest, Window], Awaitable[AudioResult]]


async def render_windows(submit: Submit, request: AudioRequest, plan: WindowPlan) -> AsyncIterator[tuple[np.ndarray, AudioResult | None]]:
    """Renders the clip window by window through `submit` (e.g. the batcher's), yielding (final samples,
    the window's result) as each window is decoded, then (the held tail, None). Nothing is submitted
    before the consumer asks for the next piece, so a consumer that stops renders no further window."""
    base = dataclasses.replace(request, duration_seconds=plan.shape.seconds, loop=False, reject_speech_music=0)
    joiner = WindowJoiner(plan)
    context = None
    for k in range(plan.count):
        result = await submit(dataclasses.replace(base, seed=window_seed(request.seed, k)),
                              Window(index=k, overlap_frames=plan.overlap_frames, context=context))
        if result.latent is None:
            raise RuntimeError("the backend returned no latent for a window")
        context = np.ascontiguousarray(result.latent[:, -plan.overlap_frames :])
        yield joiner.add(result.waveform), result
    yield joiner.finish(), None
