"""Scene mix (loudness-matched, never clipping) and the seed's file names."""
import numpy as np

from orchestrator.mix import PEAK_CEILING, TARGET_RMS, mix_layers
from orchestrator.naming import clip_file_name, safe_name


def rms(x):
    return float(np.sqrt(np.mean(np.asarray(x, dtype=np.float64) ** 2)))


def test_layers_are_loudness_matched_and_the_sum_never_clips():
    t = np.arange(16000) / 16000
    loud = 0.99 * np.sign(np.sin(2 * np.pi * 50 * t))  # a full-scale square wave
    quiet = 0.001 * np.sin(2 * np.pi * 3000 * t)
    mixed = mix_layers([loud, quiet, loud, loud])
    assert np.max(np.abs(mixed)) <= PEAK_CEILING + 1e-6
    alone = mix_layers([quiet])
    assert abs(rms(alone) - TARGET_RMS) < 1e-3  # a quiet layer is brought up to the target


def test_mix_is_as_long_as_the_longest_layer_and_silence_stays_silent():
    mixed = mix_layers([np.zeros(100), np.ones(300) * 0.1])
    assert mixed.shape == (300,) and mixed.dtype == np.float32
    assert np.all(mix_layers([np.zeros(50)]) == 0)
    assert mix_layers([]).shape == (0,)


def test_file_names_are_safe_and_numbered_like_the_seed():
    assert clip_file_name(1, "Rain drops", "drumming on a tin roof!") == "01_rain_drops_drumming_on_a_tin_roof.wav"
    assert clip_file_name(12, "../../etc", "x/y\x00z") == "12_etc_x_y_z.wav"
    assert safe_name("Café  crème") == "cafe_creme"
    assert safe_name("***") == "sound"
    assert len(safe_name("a" * 200)) == 40
