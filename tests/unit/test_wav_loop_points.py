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


def test_the_phase2_export_keeps_a_loops_points_in_its_manifest_and_its_wav(tmp_path):
    import json

    from i2s_cli.phase2 import export_phase2

    image = tmp_path / "result" / "img"
    write_wav(image / "01_rain.wav", np.zeros(32000, np.float32), 16000, loop=(0, 31900))
    clip = {"file": "01_rain.wav", "instrument": "drums", "source": "rain", "action": "falling", "prompt": "rain",
            "box": None, "loudness_lufs": None, "peak_dbfs": None, "sample_rate_hertz": 16000, "seed": 3,
            "loop_samples": [0, 31900]}
    (image / "prompts.json").write_text(json.dumps({"image": "img", "clips": [clip]}))
    assert export_phase2(tmp_path / "result", tmp_path / "out") == 1
    (entry,) = json.loads((tmp_path / "out" / "manifest.json").read_text())["clips"]
    assert entry["loop_samples"] == [0, 31900]
    assert read_loop_points(tmp_path / "out" / entry["file"]) == (0, 31900)
    clip["loop_samples"] = [0]  # the schema holds it to a pair
    (image / "prompts.json").write_text(json.dumps({"image": "img", "clips": [clip]}))
    with pytest.raises(Exception, match="loop_samples"):
        export_phase2(tmp_path / "result", tmp_path / "out2")
