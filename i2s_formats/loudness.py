"""Loudness by the standard: ITU-R BS.1770 integrated loudness (pyloudnorm: K-weighting and gating) and
sample peak of a clip or a mix, and normalising to a target under a peak ceiling without ever clipping;
plus the one resampler for output rates (soxr). pyloudnorm and soxr are imported when first used.

Normalising is a gain: to the target, then lowered where the peak would pass the ceiling (no limiter, so
the sound is never changed, only its level; the result may then be quieter than the target).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from serving.errors import InvalidInput

MIN_TARGET_LUFS, MAX_TARGET_LUFS = -70.0, 0.0
PEAK_CEILING_DBFS = -1.0
MIX_TARGET_LUFS = -23.0  # EBU R128: the scene mix's target unless the request names one (README)
# BS.1770 gates in 400 ms blocks: a shorter signal has no integrated loudness.
MIN_SECONDS = 0.4


@dataclass(frozen=True)
class Level:
    """A signal's integrated loudness (LUFS) and sample peak (dBFS); None for silence (or under 0.4 s)."""

    lufs: float | None
    peak_dbfs: float | None


def check_target(target: float) -> None:
    number = isinstance(target, (int, float)) and not isinstance(target, bool) and math.isfinite(target)
    if not (number and MIN_TARGET_LUFS <= target <= MAX_TARGET_LUFS):
        raise InvalidInput(f"loudness_target_lufs={target} must be within "
                           f"{MIN_TARGET_LUFS:g}..{MAX_TARGET_LUFS:g} LUFS")


@lru_cache(maxsize=8)
def _meter(rate: int):
    import pyloudnorm

    return pyloudnorm.Meter(rate)  # BS.1770-4, 400 ms blocks


def measure(samples: np.ndarray, rate: int) -> Level:
    """Loudness and peak of mono (n,) or multichannel (n, channels) float samples at ``rate``."""
    data = np.asarray(samples, dtype=np.float64)
    peak = float(np.max(np.abs(data))) if data.size else 0.0
    peak_dbfs = 20.0 * math.log10(peak) if peak > 0.0 else None
    lufs = None
    if peak > 0.0 and len(data) >= MIN_SECONDS * rate:
        value = float(_meter(int(rate)).integrated_loudness(data))
        lufs = value if math.isfinite(value) else None  # everything gated away: as silent as silence
    return Level(lufs=lufs, peak_dbfs=peak_dbfs)


def gain_to_target(level: Level, target_lufs: float, ceiling_dbfs: float = PEAK_CEILING_DBFS) -> float:
    """The gain in dB that brings ``level`` to ``target_lufs``, lowered so the peak stays at or under
    ``ceiling_dbfs``; 0 for silence."""
    if level.lufs is None or level.peak_dbfs is None:
        return 0.0
    return min(target_lufs - level.lufs, ceiling_dbfs - level.peak_dbfs)


def apply_gain(samples: np.ndarray, gain_db: float) -> np.ndarray:
    return (np.asarray(samples, dtype=np.float64) * 10.0 ** (gain_db / 20.0)).astype(np.float32)


def normalise(samples: np.ndarray, rate: int, target_lufs: float,
              ceiling_dbfs: float = PEAK_CEILING_DBFS) -> tuple[np.ndarray, float, Level]:
    """``samples`` at ``target_lufs`` (or quieter, under the ceiling): (the samples, the gain in dB, their
    level after the gain)."""
    before = measure(samples, rate)
    gain = gain_to_target(before, target_lufs, ceiling_dbfs)
    out = apply_gain(samples, gain) if gain else np.asarray(samples, dtype=np.float32)
    if before.lufs is None:
        return out, gain, before
    # A gain moves loudness and peak by itself (BS.1770 is linear in power): no second measurement.
    return out, gain, Level(before.lufs + gain, before.peak_dbfs + gain)


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Float32 samples (mono, or (n, channels)) from one rate to another (soxr, high quality)."""
    data = np.asarray(samples, dtype=np.float32)
    if from_rate == to_rate:
        return data
    import soxr

    return soxr.resample(data, from_rate, to_rate).astype(np.float32)


class StreamResampler:
    """:func:`resample` for a mono clip that arrives in pieces: soxr's stream runs the one-shot's filter with
    its state carried across pieces, so the pieces put together are exactly the clip resampled whole."""

    def __init__(self, from_rate: int, to_rate: int) -> None:
        import soxr

        self._stream = None if from_rate == to_rate else soxr.ResampleStream(from_rate, to_rate, 1, dtype="float32")

    def add(self, samples: np.ndarray) -> np.ndarray:
        """The output samples that are final once `samples` (the clip's next) are in."""
        data = np.asarray(samples, dtype=np.float32)
        return data if self._stream is None else self._stream.resample_chunk(data)

    def finish(self) -> np.ndarray:
        """The last output samples (the filter's tail)."""
        return np.zeros(0, np.float32) if self._stream is None else \
            self._stream.resample_chunk(np.zeros(0, np.float32), last=True)


@dataclass(frozen=True)
class Delivered:
    """A clip as it goes out: resampled, normalised when asked, and measured."""

    samples: np.ndarray
    rate: int
    level: Level
    gain_db: float


def deliver(samples: np.ndarray, model_rate: int, rate: int = 0, target_lufs: float | None = None) -> Delivered:
    """A clip at the requested ``rate`` (0: the model's) and ``target_lufs`` (None: as the model made it),
    always measured. The audio service sends every clip through here."""
    out_rate = rate or model_rate
    out = resample(samples, model_rate, out_rate)
    if target_lufs is None:
        return Delivered(out, out_rate, measure(out, out_rate), 0.0)
    out, gain, level = normalise(out, out_rate, target_lufs)
    return Delivered(out, out_rate, level, gain)


def record(metadata, level: Level, gain_db: float = 0.0) -> None:
    """Writes a level into a ClipMetadata (unset fields for silence)."""
    if level.lufs is not None:
        metadata.loudness_lufs = level.lufs
    if level.peak_dbfs is not None:
        metadata.peak_dbfs = level.peak_dbfs
    metadata.loudness_gain_db = gain_db
