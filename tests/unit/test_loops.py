"""The loop builder on synthetic signals: the wrap-around is as smooth as the clip itself, streaming it gives
the same loop, and the loop points survive into the WAV's sampler chunk."""
import numpy as np
import pytest

from audio_service.loops import LoopSeam, build_loop

RATE = 16000


def _signals():
    rng = np.random.default_rng(5)
    n = 6 * RATE
    t = np.arange(n) / RATE
    sine = 0.5 * np.sin(2 * np.pi * 437.3 * t + 0.7) + 0.01 * rng.standard_normal(n)
    chirp = 0.4 * np.sin(2 * np.pi * (200 * t + 60 * t**2))  # 200 Hz rising to ~920 Hz: the end is unlike the start
    brown = np.cumsum(rng.standard_normal(n + 2000))
    brown = (brown - np.convolve(brown, np.ones(801) / 801, mode="same"))[1000:-1000]  # a rain-like rumble
    rain = brown / np.abs(brown).max() * 0.6 * (1 + 0.3 * np.sin(2 * np.pi * 0.4 * t))
    return {"sine": sine, "chirp": chirp, "rain": rain}


def spectral_flux(x: np.ndarray, frame: int = 512, hop: int = 256) -> np.ndarray:
    frames = np.lib.stride_tricks.sliding_window_view(x, frame)[::hop] * np.hanning(frame)
    mags = np.abs(np.fft.rfft(frames, axis=-1))
    return np.sqrt(np.sum(np.diff(mags, axis=0).clip(min=0) ** 2, axis=-1))


def seam_measures(loop: np.ndarray):
    """(wrap jump, its 99th percentile bound; seam flux, its 95th percentile bound)."""
    jumps = np.abs(np.diff(loop))
    wrap = abs(float(loop[0]) - float(loop[-1]))
    twice = np.concatenate([loop, loop])  # played looped
    flux = spectral_flux(twice)
    seam_frame = len(loop) // 256 - 1  # the frame whose window has the wrap in its middle (flux vs the last)
    return wrap, np.percentile(jumps, 99), flux[seam_frame - 1], np.percentile(spectral_flux(loop), 95)


@pytest.mark.parametrize("name", ["sine", "chirp", "rain"])
def test_the_wrap_around_is_within_the_clips_own_jumps_and_flux(name):
    x = _signals()[name].astype(np.float32)
    total = 5 * RATE
    loop, (start, end) = build_loop(x[: total + LoopSeam(total, RATE).extra_samples], total, RATE)
    assert start == 0 and end == len(loop) and total - 160 <= len(loop) <= total
    wrap, jump_p99, seam_flux, flux_p95 = seam_measures(loop)
    assert wrap <= jump_p99
    assert seam_flux <= flux_p95


@pytest.mark.parametrize("name", ["sine", "chirp"])
def test_a_plain_cut_fails_the_same_measures(name):
    """The measures can fail: the clip cut at the asked length and looped as it is."""
    x = _signals()[name].astype(np.float32)[: 5 * RATE]
    wrap, jump_p99, seam_flux, flux_p95 = seam_measures(x)
    assert wrap > jump_p99 or seam_flux > flux_p95


def test_streaming_the_loop_gives_the_same_loop_as_building_it_whole():
    x = _signals()["rain"].astype(np.float32)
    total = 5 * RATE
    seam = LoopSeam(total, RATE)
    generated = x[: total + seam.extra_samples]
    whole, points = build_loop(generated, total, RATE)
    pieces = [seam.add(generated[i : i + 7000]) for i in range(0, len(generated), 7000)]
    assert sum(len(p) for p in pieces) >= total - seam.fade - seam.search - 7000  # all but the tail went out early
    streamed = np.concatenate(pieces + [seam.finish()])
    np.testing.assert_array_equal(streamed, whole)
    assert seam.loop_points == points
