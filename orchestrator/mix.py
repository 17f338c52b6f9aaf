"""The scene mix: all clips of an image layered into one soundscape, loudness-matched, never clipping.

Clips carry their own sample rate (the audio service's model decides it): the mix is made at the highest
rate among them, and any clip at another rate is resampled to it first (soxr, imported only then)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

TARGET_RMS = 0.1  # about -20 dBFS per layer before summing
PEAK_CEILING = 0.98


def mix_layers(layers: Sequence[np.ndarray], target_rms: float = TARGET_RMS) -> np.ndarray:
    """Normalises each layer to the same RMS (silent layers stay silent), sums them, and scales the sum
    down if its peak would pass PEAK_CEILING. The result is as long as the longest layer."""
    if not layers:
        return np.zeros(0, dtype=np.float32)
    length = max(len(layer) for layer in layers)
    out = np.zeros(length, dtype=np.float64)
    for layer in layers:
        layer = np.asarray(layer, dtype=np.float64)
        rms = float(np.sqrt(np.mean(layer**2))) if len(layer) else 0.0
        if rms > 1e-6:
            out[: len(layer)] += layer * (target_rms / rms)
    # Layers add up: keep the whole mix at the per-layer loudness rather than louder with every layer.
    out /= max(1.0, np.sqrt(len(layers)))
    peak = float(np.max(np.abs(out))) if length else 0.0
    if peak > PEAK_CEILING:
        out *= PEAK_CEILING / peak
    return out.astype(np.float32)


def mix_clips(clips: Sequence[tuple[np.ndarray, int]], target_rms: float = TARGET_RMS) -> tuple[np.ndarray, int]:
    """`mix_layers` over (waveform, sample rate) pairs that need not share a rate. Returns the mix and its
    rate: the highest among the clips, so no clip loses bandwidth. Raises ValueError on an empty list or a
    rate that is not positive."""
    if not clips:
        raise ValueError("no clips to mix")
    if any(rate <= 0 for _, rate in clips):
        raise ValueError("every clip needs a positive sample rate")
    rate = max(r for _, r in clips)
    layers = [np.asarray(w, dtype=np.float32) if r == rate else resample(w, r, rate) for w, r in clips]
    return mix_layers(layers, target_rms), rate


def resample(waveform: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Mono float32 samples from one rate to another (soxr, high quality)."""
    import soxr

    return soxr.resample(np.asarray(waveform, dtype=np.float32), from_rate, to_rate).astype(np.float32)
