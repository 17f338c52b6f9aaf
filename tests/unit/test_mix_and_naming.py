"""Scene mix (loudness-matched, never clipping, at the clips' own rates) and the seed's file names."""
import numpy as np
import pytest

from orchestrator.mix import PEAK_CEILING, TARGET_RMS, mix_clips, mix_layers
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


def tone(hertz: float, rate: int, seconds: float = 1.0) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * hertz * np.arange(int(rate * seconds)) / rate)).astype(np.float32)


def test_clips_at_one_rate_mix_as_layers_at_that_rate():
    a, b = tone(300, 22050), tone(500, 22050, 0.5)
    mixed, rate = mix_clips([(a, 22050), (b, 22050)])
    assert rate == 22050 and np.array_equal(mixed, mix_layers([a, b]))


def test_clips_at_different_rates_are_mixed_at_the_highest_rate_without_pitch_shift():
    mixed, rate = mix_clips([(tone(440, 16000), 16000), (tone(1000, 48000), 48000)])
    assert rate == 48000 and mixed.shape == (48000,)  # 1 s each: lengths agree once resampled
    spectrum = np.abs(np.fft.rfft(mixed))  # 1 s at 48 kHz: bin i is i Hz
    assert sorted(np.argsort(spectrum)[-2:].tolist()) == [440, 1000]
    assert np.max(np.abs(mixed)) <= PEAK_CEILING + 1e-6


def test_mix_clips_rejects_nothing_and_missing_rates():
    with pytest.raises(ValueError):
        mix_clips([])
    with pytest.raises(ValueError):
        mix_clips([(tone(440, 16000), 0)])
