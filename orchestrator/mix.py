"""The scene mix: all clips of an image layered into one soundscape, loudness-matched, never clipping."""
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
