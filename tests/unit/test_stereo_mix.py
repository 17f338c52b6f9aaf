"""The stereo scene mix, loudness and output rates on synthetic signals: the pan law's energies, the size
gain's bounds, wide ambience decorrelated, the loudness target under the peak ceiling, clips of duration x
rate samples at 44.1 / 48 kHz, and mix.json rebuilding the mix file."""
import json
import math

import numpy as np
import pytest

from i2s_formats import audio_encoding, loudness, stereo_mix
from i2s_formats.stereo_mix import StemIn
from image_to_sound.v1 import common_pb2
from serving.errors import InvalidInput

RATE = 16000


def noise(seconds=3.0, level=0.1, rate=RATE, seed=0):
    return (np.random.default_rng(seed).standard_normal(int(seconds * rate)) * level).astype(np.float32)


def box(x0, y0, x1, y1):
    return common_pb2.BoundingBox(x_min=x0, y_min=y0, x_max=x1, y_max=y1)


def energy_db(x):
    return 10 * math.log10(float(np.sum(np.asarray(x, dtype=np.float64) ** 2)))


def test_far_left_source_has_the_pan_laws_left_right_ratio_and_a_centred_one_equal_energy():
    far_left = box(0.0, 0.4, 0.08, 0.6)
    mixed, plan = stereo_mix.mix_stems([StemIn("a", "a.wav", noise(), RATE, far_left)])
    pan = plan.stems[0].pan
    assert pan < -0.9 and plan.stems[0].wide_delay_samples == 0
    left_gain, right_gain = math.cos((pan + 1) * math.pi / 4), math.sin((pan + 1) * math.pi / 4)
    expected = 20 * math.log10(left_gain / right_gain)
    assert abs((energy_db(mixed[:, 0]) - energy_db(mixed[:, 1])) - expected) < 0.5
    centred, _ = stereo_mix.mix_stems([StemIn("a", "a.wav", noise(), RATE, box(0.4, 0.4, 0.6, 0.6))])
    assert abs(energy_db(centred[:, 0]) - energy_db(centred[:, 1])) < 0.5
    assert np.allclose(centred[:, 0], centred[:, 1], atol=1e-6)  # a placed source is the same signal in both


def test_pan_law_keeps_power_constant():
    for pan in np.linspace(-1, 1, 9):
        left, right = stereo_mix.pan_gains(pan)
        assert abs(left**2 + right**2 - 1) < 1e-12


def test_size_gain_is_bounded_and_grows_with_the_box():
    gains = [stereo_mix.place(box(0.5 - s / 2, 0.5 - s / 2, 0.5 + s / 2, 0.5 + s / 2)).size_gain_db
             for s in (0.01, 0.2, 0.5, 0.7)]
    assert gains == sorted(gains) and gains[0] < gains[-1]
    assert all(-stereo_mix.SIZE_GAIN_DB <= g <= stereo_mix.SIZE_GAIN_DB for g in gains)


def test_no_box_or_a_box_over_most_of_the_picture_is_wide_and_decorrelated():
    assert stereo_mix.place(None).wide and stereo_mix.place(box(0.0, 0.0, 0.95, 0.9)).wide
    mixed, plan = stereo_mix.mix_stems([StemIn("a", "a.wav", noise(), RATE, None)])
    assert plan.stems[0].wide_delay_samples > 0
    left, right = mixed[:, 0].astype(np.float64), mixed[:, 1].astype(np.float64)
    correlation = np.corrcoef(left, right)[0, 1]
    assert abs(correlation) < 0.1  # not a centred copy (that would be 1)
    assert abs(energy_db(left) - energy_db(right)) < 0.5


@pytest.mark.parametrize("target", [-23.0, -14.0, -30.0])
def test_the_mix_meets_its_loudness_target_under_the_peak_ceiling(target):
    stems = [StemIn("a", "a.wav", noise(level=0.3, seed=1), RATE, box(0.0, 0.0, 0.2, 0.3)),
             StemIn("b", "b.wav", noise(level=0.01, seed=2), RATE, box(0.6, 0.5, 0.9, 0.9)),
             StemIn("c", "c.wav", noise(level=0.05, seed=3), RATE, None)]
    mixed, plan = stereo_mix.mix_stems(stems, target)
    level = loudness.measure(mixed, RATE)
    assert abs(level.lufs - target) < 0.5
    assert level.peak_dbfs <= loudness.PEAK_CEILING_DBFS + 1e-6


def test_a_peaky_mix_is_turned_down_to_the_ceiling_rather_than_clipped():
    clicks = np.zeros(3 * RATE, dtype=np.float32)
    clicks[:: RATE // 2] = 0.9  # loud spikes, little energy: at -5 LUFS the peak would pass 0 dBFS
    mixed, plan = stereo_mix.mix_stems([StemIn("a", "a.wav", clicks + noise(level=0.001), RATE, None)], -5.0)
    level = loudness.measure(mixed, RATE)
    assert level.peak_dbfs <= loudness.PEAK_CEILING_DBFS + 1e-6 and level.lufs < -5.0
    assert np.max(np.abs(mixed)) < 1.0


def test_normalising_a_clip_meets_the_target_and_never_clips():
    out, gain, level = loudness.normalise(noise(level=0.01), RATE, -20.0)
    assert abs(level.lufs + 20.0) < 0.5 and level.peak_dbfs <= -1.0 + 1e-6 and gain > 0
    measured = loudness.measure(out, RATE)  # the level it reports is the level it made
    assert abs(measured.lufs - level.lufs) < 0.01 and abs(measured.peak_dbfs - level.peak_dbfs) < 0.01
    silent = loudness.measure(np.zeros(RATE), RATE)
    assert silent.lufs is None and silent.peak_dbfs is None
    assert loudness.normalise(np.zeros(RATE, dtype=np.float32), RATE, -20.0)[1] == 0.0


@pytest.mark.parametrize("rate", [44100, 48000])
@pytest.mark.parametrize("seconds", [1.0, 4.0, 2.5])
def test_a_clip_at_a_studio_rate_has_duration_times_rate_samples(rate, seconds):
    model = noise(seconds)
    out = loudness.deliver(model, RATE, rate, None)
    assert out.rate == rate and abs(len(out.samples) - seconds * rate) <= 1
    assert np.array_equal(loudness.deliver(model, RATE).samples, model)  # the default: the model's samples


def test_mix_json_rebuilds_the_mix_file_within_minus_80_db(tmp_path):
    stems = [StemIn("img-01", "01_a.wav", noise(seed=4), RATE, box(0.05, 0.1, 0.3, 0.4)),
             StemIn("img-02", "02_b.wav", noise(2.0, 0.02, seed=5), RATE, None),
             StemIn("img-03", "03_c.wav", noise(level=0.2, seed=6), RATE, box(0.7, 0.6, 0.95, 0.99))]
    for s in stems:  # the stem files as the command line writes them
        audio_encoding.write_wav(tmp_path / s.file_name, s.samples, s.rate)
    mixed, plan = stereo_mix.mix_stems(stems, -16.0)
    saved_stems = {s.clip_id: (stereo_mix.as_saved(s.samples), s.rate) for s in stems}
    assert np.array_equal(stereo_mix.render(plan, saved_stems), mixed)  # the plan is the mix, sample for sample
    audio_encoding.write_wav(tmp_path / "scene_mix.wav", mixed, RATE)
    (tmp_path / "mix.json").write_text(json.dumps(stereo_mix.to_json(plan, "scene_mix.wav")))

    data = json.loads((tmp_path / "mix.json").read_text())
    files = {s["clip_id"]: audio_encoding.read_wav(tmp_path / s["file"]) for s in data["stems"]}
    rebuilt = stereo_mix.render(stereo_mix.from_json(data), files)
    saved, rate = audio_encoding.read_wav(tmp_path / data["file"])
    assert rate == data["sample_rate_hertz"] and saved.shape == rebuilt.shape == (3 * RATE, 2)
    error = float(np.max(np.abs(saved - rebuilt)))
    assert 20 * math.log10(max(error, 1e-12)) < -80


def test_mix_of_clips_at_different_rates_is_made_at_the_highest():
    mixed, plan = stereo_mix.mix_stems([StemIn("a", "a.wav", noise(1.0), RATE, None),
                                        StemIn("b", "b.wav", noise(1.0, rate=48000), 48000, None)])
    assert plan.sample_rate_hertz == 48000 and mixed.shape == (48000, 2)
    with pytest.raises(ValueError):
        stereo_mix.mix_stems([])


@pytest.mark.parametrize("target", [-71.0, 0.5, float("nan"), float("inf")])
def test_a_loudness_target_out_of_range_is_refused(target):
    with pytest.raises(InvalidInput, match="loudness_target_lufs"):
        loudness.check_target(target)
