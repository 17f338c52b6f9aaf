"""A clip that is more than one model call: long (windows), looped, or guarded against speech and music.

`make_clip` yields the clip's samples as they become final, then a `MadeClip` with what the metadata
needs. It composes the three pieces, each in its own module:
- audio_service/long_clips.py: a clip whose generated length is over one model call is made in windows
  (each through the batcher), streamed as each is decoded; otherwise one batcher call.
- audio_service/loops.py: a loop is generated `extra_samples` longer; its start is chosen from the first
  samples, everything but its tail streams, the crossfaded tail comes last.
- audio_service/speech_music_guard.py: the first window (or the whole short clip) is judged before any
  of it goes out; a refused try is dropped (its windows stop) and made again with the next seed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

import numpy as np

from audio_service import long_clips, speech_music_guard
from audio_service.backend import AudioRequest, AudioResult, Window, WindowShape, num_samples
from audio_service.loops import LoopSeam
from i2s_formats import contract
from serving.errors import InvalidInput

__all__ = ["MadeClip", "make_clip", "needs_clip_maker"]

SubmitWindow = Callable[[AudioRequest, Window], Awaitable[AudioResult]]
SubmitClip = Callable[[AudioRequest], Awaitable[AudioResult]]


def needs_clip_maker(request: AudioRequest) -> bool:
    return request.windowed or request.loop or request.reject_speech_music > 0


def can_guard(backend) -> bool:
    """Whether `backend` scores clips against texts, which the speech/music guard needs (diffusers does)."""
    return hasattr(backend, "score_candidates")


@dataclass
class MadeClip:
    results: list[AudioResult]  # the kept try's model results (one per window)
    seed: int  # the kept try's seed
    windows: int = 1
    join_samples: list[int] = field(default_factory=list)
    loop_points: tuple[int, int] | None = None
    attempts: list[speech_music_guard.GuardAttempt] = field(default_factory=list)


async def _pieces(request: AudioRequest, generated: int, shape: WindowShape | None, sample_rate: int,
                  submit_clip: SubmitClip, submit_window: SubmitWindow, plan_out: list):
    """(samples, result) of one try, as made: windows over one call's maximum, else one call."""
    if generated > num_samples(contract.MAX_SINGLE_WINDOW_SECONDS, sample_rate):
        if shape is None:
            raise InvalidInput(f"settings: duration_seconds={request.duration_seconds:g}; this audio backend makes "
                               f"clips of at most {contract.MAX_SINGLE_WINDOW_SECONDS:g} s")
        plan = long_clips.WindowPlan.for_clip(shape, generated)
        plan_out.append(plan)
        async for piece in long_clips.render_windows(submit_window, request, plan):
            yield piece
        return
    one = dataclasses.replace(request, duration_seconds=generated / sample_rate, loop=False, reject_speech_music=0)
    result = await submit_clip(one)
    yield result.waveform, result


async def make_clip(request: AudioRequest, *, sample_rate: int, shape: WindowShape | None, submit_clip: SubmitClip,
                    submit_window: SubmitWindow, backend=None, guard_margin: float = 0.0,
                    ) -> AsyncIterator[np.ndarray | MadeClip]:
    total = num_samples(request.duration_seconds, sample_rate)
    attempts: list[speech_music_guard.GuardAttempt] = []
    tries = 1 + request.reject_speech_music
    if request.reject_speech_music and not can_guard(backend):
        raise InvalidInput("settings: reject_speech_music needs an audio backend that scores clips (diffusers)")
    for attempt in range(tries):
        seed = speech_music_guard.guard_seed(request.seed, attempt)
        seam = LoopSeam(total, sample_rate) if request.loop else None
        generated = total + (seam.extra_samples if seam else 0)
        plans: list = []
        pieces = _pieces(dataclasses.replace(request, seed=seed), generated, shape, sample_rate, submit_clip,
                         submit_window, plans)
        try:
            samples, result = await pieces.__anext__()
            if request.reject_speech_music:
                judged = await speech_music_guard.judge(backend, request.prompt, result.waveform, seed, guard_margin)
                attempts.append(judged)
                if judged.rejected and attempt + 1 < tries:
                    continue  # this try's later windows are never made (the generator is closed below)
            results = [result]
            yield seam.add(samples) if seam else samples
            async for samples, result in pieces:
                if result is not None:
                    results.append(result)
                yield seam.add(samples) if seam else samples
        finally:
            await pieces.aclose()
        if seam:
            yield seam.finish()
        plan = plans[0] if plans else None
        skipped = seam.start if seam else 0  # a loop starts that far into what was generated
        yield MadeClip(results=results, seed=seed, windows=plan.count if plan else 1,
                       join_samples=[j - skipped for j in plan.join_samples if j >= skipped] if plan else [],
                       loop_points=seam.loop_points if seam else None, attempts=attempts)
        return
