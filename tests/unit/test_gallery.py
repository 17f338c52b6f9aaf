"""The gallery writer on hand-made result folders: what it draws, what it links, what it refuses."""
import json
import os

import numpy as np
import pytest

from i2s_cli import gallery
from i2s_formats.audio_encoding import write_wav

SR = 16000


def tone(hertz: float, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.5 * np.sin(2 * np.pi * hertz * t)).astype(np.float32)


def image_folder(result, stem, clips, **manifest):
    folder = result / stem
    for entry in clips:
        if isinstance(entry, dict) and "/" not in entry["file"] and not entry.pop("_missing", False):
            write_wav(folder / entry["file"], tone(entry.pop("_hertz", 440.0)), SR)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prompts.json").write_text(json.dumps({"image": "", "scene": "s", "mood": "m", "clips": clips, **manifest}))
    return folder


def clip(file, **extra):
    return {"file": file, "source": "kettle", "action": "whistling", "instrument": "None", "prompt": "A kettle whistles",
            "negative_prompt": "music", "seed": 7, "steps": 2, "score": 0.1234567, **extra}


def test_log_mel_puts_a_tone_in_its_mel_band():
    power = gallery.log_mel(tone(1000.0), SR)
    assert power.shape[0] == gallery.N_MELS and power.shape[1] == pytest.approx(SR * 1.0 / (gallery.HOP_SECONDS * SR), abs=2)
    assert power.max() - power.min() == pytest.approx(gallery.DB_RANGE, abs=0.01)
    # Band centres on the HTK mel scale, 0 Hz to Nyquist: the loudest band holds 1 kHz.
    mel = np.linspace(0.0, gallery._mel(SR / 2), gallery.N_MELS + 2)
    centres = 700.0 * (10 ** (mel / 2595.0) - 1.0)
    loudest = centres[1:-1][np.argmax(power[:, power.shape[1] // 2])]
    assert abs(loudest - 1000.0) < (centres[2] - centres[1]) * 3


@pytest.mark.filterwarnings("ignore:At least one mel filter")  # the 30-sample clip: 9 bins for 64 bands
@pytest.mark.parametrize("samples, rate", [(16000, 16000), (32000, 16000), (700, 16000), (30, 16000), (22050, 22050)])
def test_log_mel_equals_transformers_audio_utils(samples, rate):
    """The numpy log-mel is the one transformers computes (what the gallery used before): same framing,
    window, filters and dB floor, on noise with a tone, long and short clips, another rate."""
    from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

    t = np.arange(samples) / rate
    waveform = (0.3 * np.sin(2 * np.pi * 700 * t) + 0.05 * np.random.default_rng(0).standard_normal(samples))
    waveform = waveform.astype(np.float32)
    n_fft = min(gallery.N_FFT, 1 << max(samples.bit_length() - 1, 4))
    filters = mel_filter_bank(num_frequency_bins=n_fft // 2 + 1, num_mel_filters=gallery.N_MELS, min_frequency=0.0,
                              max_frequency=rate / 2, sampling_rate=rate, mel_scale="htk")
    want = spectrogram(waveform, window_function(n_fft, "hann"), frame_length=n_fft,
                       hop_length=max(1, int(gallery.HOP_SECONDS * rate)), power=2.0, mel_filters=filters,
                       log_mel="dB", db_range=gallery.DB_RANGE)
    got = gallery.log_mel(waveform, rate)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-3)


def test_writing_a_gallery_imports_no_model_library(tmp_path):
    import subprocess
    import sys

    result = tmp_path / "result"
    image_folder(result, "cup", [clip("01_a.wav")])
    code = ("import sys; from i2s_cli.gallery import write_gallery; write_gallery(sys.argv[1]); "
            "print(sorted(m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(result)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert (result / "cup" / gallery.SPECTROGRAM_DIR / "01_a.png").is_file()


def test_nothing_to_show_writes_nothing(tmp_path):
    assert gallery.write_gallery(tmp_path) is None and not (tmp_path / "index.html").exists()


def test_a_hostile_manifest_is_escaped_and_links_stay_in_the_image_folder(tmp_path):
    outside = tmp_path / "outside.wav"
    write_wav(outside, tone(440.0), SR)
    result = tmp_path / "result"
    image_folder(result, "a b#", [
        clip("01_x y#.wav", prompt="<script>alert(1)</script> a kettle", _hertz=2000.0),
        clip("../../outside.wav"), clip("sub/02.wav"), "not a clip", clip("03_missing.wav", _missing=True),
    ])
    (result / "broken").mkdir()
    (result / "broken" / "prompts.json").write_text("{not json")
    page = gallery.write_gallery(result)
    html = page.read_text()
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt; a kettle" in html
    assert 'src="a%20b%23/01_x%20y%23.wav"' in html and 'src="a%20b%23/spectrograms/01_x%20y%23.png"' in html
    assert "outside" not in html and "sub/02" not in html and "03_missing" not in html
    assert "picture not found" in html and 'data-stem="broken"' not in html
    assert 'data-score="0.1234567"' in html and ">0.1235<" in html
    png = result / "a b#" / "spectrograms" / "01_x y#.png"
    from PIL import Image

    with Image.open(png) as drawn:
        assert drawn.format == "PNG" and drawn.size == (480, 220)


def test_spectrograms_follow_their_clips(tmp_path):
    result = tmp_path / "result"
    folder = image_folder(result, "one", [clip("01_a.wav"), clip("02_b.wav")])
    gallery.write_gallery(result)
    first, second = folder / "spectrograms" / "01_a.png", folder / "spectrograms" / "02_b.png"
    assert first.is_file() and second.is_file()
    os.utime(first, ns=(1, 1))  # older than its clip: drawn again
    os.utime(second, ns=(2**62, 2**62))  # newer than its clip: kept
    gallery.write_gallery(result)
    assert first.stat().st_mtime_ns > 1 and second.stat().st_mtime_ns == 2**62
    manifest = json.loads((folder / "prompts.json").read_text())
    manifest["clips"] = manifest["clips"][:1]  # a later run made one clip only
    (folder / "prompts.json").write_text(json.dumps(manifest))
    gallery.write_gallery(result)
    assert first.is_file() and not second.exists()


def test_the_blitted_spectrogram_is_the_full_redraw_pixel_for_pixel(tmp_path):
    # The painter draws axes and colour bar once per clip length and only the image per clip; matplotlib's
    # full redraw of the same figure (the plain path) must give the same pixels, for each of two lengths.
    from PIL import Image

    from i2s_cli.gallery import SpectrogramPainter

    painter = SpectrogramPainter()
    for seconds, hertz in ((1.0, 440.0), (0.5, 3000.0), (1.0, 1000.0)):
        wav = write_wav(tmp_path / f"tone_{hertz:.0f}.wav", tone(hertz, seconds), SR)
        fast = np.asarray(Image.open(painter.draw(wav, tmp_path / f"{wav.stem}.png")).convert("RGBA"))
        painter.figure.savefig(tmp_path / "full.png", format="png")
        full = np.asarray(Image.open(tmp_path / "full.png").convert("RGBA"))
        assert fast.shape == full.shape and np.array_equal(fast, full), (seconds, hertz)


def test_the_drawer_draws_each_clip_as_it_comes_and_the_gallery_keeps_them(tmp_path):
    result = tmp_path / "result"
    folder = image_folder(result, "cup", [clip("01_a.wav"), clip("02_b.wav", _hertz=3000.0)])
    drawer = gallery.SpectrogramDrawer()
    for name in ("01_a.wav", "02_b.wav"):
        drawer.submit(folder / name)
    drawer.submit(folder / "03_never_written.wav")  # a clip that is not there: nothing drawn, nothing raised
    drawer.close()  # waits for what was queued
    pngs = {p.name: p.stat().st_mtime_ns for p in (folder / gallery.SPECTROGRAM_DIR).glob("*.png")}
    assert set(pngs) == {"01_a.png", "02_b.png"}
    gallery.write_gallery(result)  # finds them drawn and newer than their clips: draws none again
    assert {p.name: p.stat().st_mtime_ns for p in (folder / gallery.SPECTROGRAM_DIR).glob("*.png")} == pngs


def test_a_loop_plays_looped_and_a_long_clip_says_where_its_windows_join(tmp_path):
    result = tmp_path / "result"
    image_folder(result, "street", [
        clip("01_loop.wav", loop_samples=[0, 16000]),
        clip("02_long.wav", windows=3, window_join_samples=[163840, 286720], sample_rate_hertz=16000,
             guard_attempts=[{"seed": 7, "rejected": True}, {"seed": 9, "rejected": False}]),
        clip("03_plain.wav"),
    ])
    html = gallery.write_gallery(result).read_text()
    audios = {line.split('src="street/')[1].split('"')[0]: line for line in html.splitlines() if "<audio" in line}
    assert audios["01_loop.wav"].rstrip().endswith(" loop></audio>") and " loop" not in audios["03_plain.wav"]
    assert "samples 0 to 16000" in html
    assert "3, joined at 10.24 s, 17.92 s" in html and "2 tries, 1 refused" in html
