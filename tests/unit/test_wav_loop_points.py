"""The WAV sampler chunk: loop points written, read back, replaced, and the audio left as it was."""
import numpy as np
import pytest
import soundfile as sf

from i2s_formats.audio_encoding import write_wav
from i2s_formats.wav_loop_points import add_loop_points, read_loop_points


def test_loop_points_are_read_back_and_the_samples_are_untouched(tmp_path):
    wave = np.sin(np.linspace(0, 300, 16001)).astype(np.float32) * 0.5  # odd length: a padded data chunk
    plain = write_wav(tmp_path / "plain.wav", wave, 16000)
    looped = write_wav(tmp_path / "loop.wav", wave, 16000, loop=(0, 16001))
    assert read_loop_points(plain) is None
    assert read_loop_points(looped) == (0, 16001)
    a, _ = sf.read(plain, dtype="int16")
    b, rate = sf.read(looped, dtype="int16")
    assert rate == 16000 and np.array_equal(a, b)
    again = add_loop_points(looped.read_bytes(), 100, 9000, 16000)  # replaces, never adds a second chunk
    assert read_loop_points(again) == (100, 9000) and again.count(b"smpl") == 1
    assert int.from_bytes(again[4:8], "little") == len(again) - 8  # the RIFF size is right


@pytest.mark.parametrize("start,end", [(5, 5), (-1, 10), (10, 3)])
def test_impossible_loop_points_are_refused(tmp_path, start, end):
    path = write_wav(tmp_path / "x.wav", np.zeros(100, np.float32), 16000)
    with pytest.raises(ValueError):
        add_loop_points(path.read_bytes(), start, end, 16000)
