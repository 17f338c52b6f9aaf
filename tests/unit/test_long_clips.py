"""Long clips without a model: the window plan, the join, the streamed chunks, and stopping between windows."""
import asyncio

import numpy as np
import pytest

from audio_service.backend import AudioResult, WindowShape
from audio_service.long_clips import WindowJoiner, WindowPlan, crossfade, render_windows, window_seed
from i2s_formats import audio_encoding
from i2s_formats.chunk_stream import ChunkStream
from i2s_formats.contract import AudioRequest
from image_to_sound.v1 import common_pb2

SHAPE = WindowShape(frames=256, frame_samples=640, sample_rate_hertz=16000)  # cvssp/audioldm2: 10.24 s


@pytest.mark.parametrize("seconds", [30.5, 60.0, 61.3, 300.0])
def test_the_windows_cover_the_clip_and_the_pieces_add_up_to_its_exact_length(seconds):
    total = int(round(seconds * 16000))
    plan = WindowPlan.for_clip(SHAPE, total)
    assert plan.overlap_frames == 64 and plan.stride_samples == 192 * 640
    assert (plan.count - 1) * plan.stride_samples + plan.window_samples >= total
    assert (plan.count - 2) * plan.stride_samples + plan.window_samples < total  # no window too many
    joiner = WindowJoiner(plan)
    rng = np.random.default_rng(0)
    pieces = [joiner.add(rng.standard_normal(plan.window_samples).astype(np.float32)) for _ in range(plan.count)]
    pieces.append(joiner.finish())
    assert sum(len(p) for p in pieces) == total
    assert len(pieces[0]) == plan.window_samples - plan.overlap_samples  # the first window goes out at once
    assert plan.join_samples == [k * plan.stride_samples + plan.overlap_samples // 2 for k in range(1, plan.count)]


def test_the_crossfade_keeps_power_for_unrelated_audio_and_gain_for_the_same_audio():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((2, 20000)).astype(np.float32)
    mixed = crossfade(a, b)
    middle = slice(8000, 12000)
    assert np.mean(mixed[middle] ** 2) == pytest.approx(1.0, rel=0.1)  # constant power, uncorrelated
    same = crossfade(a, a)
    np.testing.assert_allclose(same, a, atol=1e-5)  # no 3 dB swell when both sides are one signal
    assert mixed[0] == pytest.approx(a[0], abs=1e-3) and mixed[-1] == pytest.approx(b[-1], abs=1e-3)


@pytest.mark.parametrize("encoding", [audio_encoding.PCM16, audio_encoding.FLOAT32, audio_encoding.WAV])
def test_a_chunk_stream_sends_what_audio_chunks_sends_for_the_whole_clip(encoding):
    rng = np.random.default_rng(2)
    wave = (rng.standard_normal(40000) * 0.3).astype(np.float32)
    metadata = common_pb2.ClipMetadata(num_samples=len(wave), window_count=2)
    whole = list(audio_encoding.audio_chunks("c", wave, 16000, encoding, 0.25, metadata))
    stream = ChunkStream("c", 16000, encoding, 0.25)
    pieces, start = [], 0
    for size in (3999, 4000, 1, 12000, 20000):  # ends exactly on a chunk boundary
        pieces += list(stream.add(wave[start : start + size]))
        start += size
    assert start == len(wave)
    pieces += list(stream.finish(metadata))
    assert [p.SerializeToString() for p in pieces] == [w.SerializeToString() for w in whole]


class FakeWindowBackend:
    """Counts windows; each returns noise and a latent whose overlap records the context it was given."""

    def __init__(self, shape: WindowShape):
        self.shape, self.windows = shape, []

    async def submit(self, request, window):
        self.windows.append((request, window))
        frames = self.shape.frames
        latent = np.full((2, frames, 4), float(len(self.windows)), np.float32)
        if window.context is not None:
            latent[:, : window.overlap_frames] = window.context
        wave = np.random.default_rng(request.seed).standard_normal(frames * self.shape.frame_samples).astype(np.float32)
        return AudioResult(waveform=wave, sample_rate_hertz=16000, score=0.1, steps_run=2, scheduler="dpm",
                           model_id="fake", latent=latent)


def test_windows_carry_the_context_and_seeds_and_stop_when_the_consumer_stops():
    shape = WindowShape(frames=64, frame_samples=640, sample_rate_hertz=16000)  # the tiny checkpoint's
    request = AudioRequest(prompt="wind", duration_seconds=60.0, seed=9, num_inference_steps=2)
    plan = WindowPlan.for_clip(shape, 60 * 16000)
    fake = FakeWindowBackend(shape)

    async def first_only():
        pieces = render_windows(fake.submit, request, plan)
        first = await pieces.__anext__()
        await pieces.aclose()  # the caller went away after the first window
        return first

    samples, result = asyncio.run(first_only())
    assert len(fake.windows) == 1 and len(samples) == plan.window_samples - plan.overlap_samples
    assert fake.windows[0][1].context is None and fake.windows[0][0].seed == 9

    fake = FakeWindowBackend(shape)

    async def all_of_it():
        return [s async for s, _ in render_windows(fake.submit, request, plan)]

    pieces = asyncio.run(all_of_it())
    assert sum(len(p) for p in pieces) == 60 * 16000 and len(fake.windows) == plan.count
    for k, (req, window) in enumerate(fake.windows):
        assert window.index == k and req.seed == window_seed(9, k) and req.prompt == "wind"
        assert req.duration_seconds == pytest.approx(shape.seconds)
        if k:
            assert np.all(window.context == k)  # window k-1's final latent over the overlap
    assert len({req.seed for req, _ in fake.windows}) == plan.count
