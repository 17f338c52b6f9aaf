"""The scene mix of one image: its finished variant clips placed in stereo by their sources' boxes and
brought to a loudness target (the math and the data that describe it: i2s_formats.stereo_mix).

Clips carry their own sample rate: the mix is made at the highest among them (the others resampled)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from i2s_formats import loudness, stereo_mix
from image_to_sound.v1 import common_pb2, orchestrator_pb2 as pb

FILE_NAME = "scene_mix.wav"


@dataclass(frozen=True)
class SceneMixResult:
    samples: np.ndarray  # (frames, 2) float32
    rate: int
    plan: pb.SceneMix
    level: loudness.Level


def scene_mix(stems: Sequence[stereo_mix.StemIn], target_lufs: float | None = None) -> SceneMixResult:
    """The stereo mix of ``stems`` at ``target_lufs`` (None: loudness.MIX_TARGET_LUFS), measured."""
    target = loudness.MIX_TARGET_LUFS if target_lufs is None else target_lufs
    samples, plan = stereo_mix.mix_stems(stems, target)
    return SceneMixResult(samples, plan.sample_rate_hertz, plan, loudness.measure(samples, plan.sample_rate_hertz))


def metadata(result: SceneMixResult) -> common_pb2.ClipMetadata:
    """The mix's ClipMetadata: length, rate, loudness and peak."""
    out = common_pb2.ClipMetadata(duration_seconds=len(result.samples) / result.rate, sample_rate_hertz=result.rate,
                                  num_samples=len(result.samples),
                                  prompt="stereo scene mix of %d clips" % len(result.plan.stems))
    loudness.record(out, result.level, result.plan.gain_db)
    return out
