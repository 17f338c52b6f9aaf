"""Long clips on the tiny AudioLDM2 checkpoint: a 60 s clip streamed window by window through the audio
servicer and its batcher, each window held to the last one's latent over the overlap.

The tiny checkpoint's native window (64 latent frames, 2.56 s) would make a 60 s clip 31 windows; the
backend's `window_frames` makes it 512 frames (20.48 s) so the clip is 4 windows on a CPU."""
import numpy as np
import pytest
import pytest_asyncio

from audio_service.config import AudioConfig
from audio_service.diffusers_backend import DiffusersAudioBackend
from audio_service.long_clips import WindowPlan
from audio_service.server import AudioServicer
from i2s_formats import audio_encoding
from image_to_sound.v1 import audio_pb2, common_pb2

PROMPT = "wind through pine trees, steady rustle"
RATE = 16000


class RecordingBackend(DiffusersAudioBackend):
    """The real backend, keeping what each call was asked and returned (windows and their latents)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []  # (windows, results) of every call that finished

    def generate(self, requests, *, should_stop=None, on_step=None, deadline=None, windows=None):
        results = super().generate(requests, should_stop=should_stop, on_step=on_step, deadline=deadline,
                                   windows=windows)
        self.calls.append((windows, results))
        return results


@pytest_asyncio.fixture(scope="module")
async def long_audio(tiny_audio_dir):
    backend = RecordingBackend(str(tiny_audio_dir), device="cpu", prompt_cache_size=8, window_frames=512)
    backend.load()
    servicer = AudioServicer(backend, AudioConfig(model=str(tiny_audio_dir), max_wait_ms=0))
    yield servicer, backend
    await servicer.close()
    backend.close()


def request(seconds: float, **kwargs) -> audio_pb2.GenerateAudioRequest:
    settings = common_pb2.AudioSettings(**{"duration_seconds": seconds, "num_inference_steps": 2, "seed": 4, **kwargs})
    return audio_pb2.GenerateAudioRequest(prompt=PROMPT, settings=settings, clip_id="long")


@pytest_asyncio.fixture(scope="module")
async def sixty_seconds(long_audio):
    servicer, backend = long_audio
    backend.calls.clear()
    events = [r async for r in servicer.GenerateAudio(request(60.0), None)]
    return events, list(backend.calls)


async def test_a_60_s_request_streams_60_s_in_windows(sixty_seconds, long_audio):
    events, calls = sixty_seconds
    chunks = [e.chunk for e in events if e.WhichOneof("event") == "chunk"]
    wave = audio_encoding.decode_payloads([c.data for c in chunks], chunks[0].encoding)
    assert abs(len(wave) - 60 * RATE) <= 640  # within one latent frame (it is exact)
    meta = chunks[-1].metadata
    plan = WindowPlan.for_clip(long_audio[1].window_shape(), 60 * RATE)
    assert meta.window_count == plan.count == len(calls) == 4 and meta.num_samples == len(wave)
    assert list(meta.window_join_samples) == plan.join_samples
    # Streamed: the first window's chunks go out before the second window has made a step.
    kinds = [(e.WhichOneof("event"), e.progress.steps_done) for e in events]
    first_chunk = kinds.index(("chunk", 0))
    assert first_chunk < kinds.index(("progress", 3))  # step 1 of window 2 (2 steps a window)
    progress = [e.progress for e in events if e.WhichOneof("event") == "progress"]
    assert progress[-1].steps_done == progress[-1].steps_total == 8


async def test_every_window_after_the_first_ends_with_the_last_windows_latent_over_the_overlap(sixty_seconds):
    _, calls = sixty_seconds
    latents = [results[0].latent for _, results in calls]
    overlap = calls[1][0][0].overlap_frames
    assert calls[0][0][0].context is None and overlap == 128
    for previous, current in zip(latents, latents[1:]):
        np.testing.assert_array_equal(current[:, :overlap], previous[:, -overlap:])
        assert not np.array_equal(current[:, overlap:2 * overlap], previous[:, -overlap:])  # the rest is new


async def test_no_join_jumps_more_than_the_clips_own_99th_percentile(sixty_seconds, long_audio):
    events, _ = sixty_seconds
    chunks = [e.chunk for e in events if e.WhichOneof("event") == "chunk"]
    wave = audio_encoding.decode_payloads([c.data for c in chunks], chunks[0].encoding)
    jumps = np.abs(np.diff(wave))
    p99 = np.percentile(jumps, 99)
    plan = WindowPlan.for_clip(long_audio[1].window_shape(), 60 * RATE)
    for k in range(1, plan.count):  # the crossfade's two ends: where one window's audio meets the other's
        start = k * plan.stride_samples
        for at in (start, start + plan.overlap_samples):
            assert jumps[at - 1] <= p99, (k, at, jumps[at - 1], p99)


async def test_cancelling_after_the_first_window_renders_no_further_window(long_audio):
    servicer, backend = long_audio
    backend.calls.clear()
    stream = servicer.GenerateAudio(request(60.0, seed=7), None)
    async for event in stream:
        if event.WhichOneof("event") == "chunk":
            break
    await stream.aclose()  # the caller goes away with the first window's audio
    await servicer.batcher.wait_idle()
    assert len(backend.calls) == 1  # the second window, if it had started, stopped at its next step
    assert servicer.batcher.queue_depth == 0


@pytest.mark.parametrize("seconds", [30.5, 301.0])
async def test_a_clip_over_the_services_maximum_is_invalid_and_nothing_is_rendered(long_audio, seconds):
    from serving.errors import InvalidInput
    servicer, backend = long_audio
    servicer_small = AudioServicer(backend, AudioConfig(model="x", max_clip_seconds=30.0))
    backend.calls.clear()
    with pytest.raises(InvalidInput, match="duration_seconds"):
        [e async for e in servicer_small.GenerateAudio(request(seconds), None)]
    assert backend.calls == []
    await servicer_small.close()


async def test_a_loop_clip_carries_its_loop_points_into_the_wav_and_the_manifest(long_audio, tmp_path):
    from i2s_cli.cli import Writer
    from i2s_client.client import Clip
    from i2s_formats.wav_loop_points import read_loop_points
    from image_to_sound.v1 import orchestrator_pb2

    servicer, backend = long_audio
    backend.calls.clear()
    events = [e async for e in servicer.GenerateAudio(request(3.0, loop=True), None)]
    chunks = [e.chunk for e in events if e.WhichOneof("event") == "chunk"]
    meta = chunks[-1].metadata
    assert len(backend.calls) == 1 and backend.calls[0][0] is None  # one plain model call, a little longer
    assert meta.loop_start_sample == 0 and meta.loop_end_sample == meta.num_samples
    assert 3 * RATE - 160 <= meta.num_samples <= 3 * RATE  # the loop ends at most 10 ms early
    clip = Clip(ref=orchestrator_pb2.ClipRef(clip_id="long", file_name="01_wind_rustle.wav"), metadata=meta,
                payloads=[c.data for c in chunks], encoding=chunks[0].encoding)
    path = clip.save(tmp_path)
    assert read_loop_points(path) == (0, meta.num_samples)
    import soundfile as sf
    assert sf.info(str(path)).frames == meta.num_samples  # the extra chunk leaves the audio as it was
    entry = Writer._manifest_entry(None, clip, "v1")
    assert entry["loop_samples"] == [0, meta.num_samples]


async def test_the_guard_retries_n_times_with_new_seeds_records_every_try_and_keeps_the_last(long_audio):
    servicer, backend = long_audio
    strict = AudioServicer(backend, AudioConfig(model="x", max_wait_ms=0, speech_music_margin=3.0))  # no clip passes
    backend.calls.clear()
    events = [e async for e in strict.GenerateAudio(request(2.0, reject_speech_music=2), None)]
    await strict.close()
    meta = [e.chunk for e in events if e.WhichOneof("event") == "chunk"][-1].metadata
    tries = list(meta.guard_attempts)
    assert len(tries) == 3 and len(backend.calls) == 3 and all(t.rejected for t in tries)
    assert tries[0].seed == 4 and len({t.seed for t in tries}) == 3
    assert [results[0].waveform.shape for _, results in backend.calls] == [(2 * RATE,)] * 3
    assert meta.seed == tries[-1].seed  # the last try is kept
    for t in tries:
        assert all(-1.0 <= s <= 1.0 for s in (t.caption_score, t.speech_score, t.singing_score, t.music_score))


async def test_the_guard_with_the_default_margin_keeps_a_clip_it_does_not_refuse(long_audio):
    servicer, backend = long_audio
    lenient = AudioServicer(backend, AudioConfig(model="x", max_wait_ms=0, speech_music_margin=-3.0))  # every clip passes
    events = [e async for e in lenient.GenerateAudio(request(2.0, reject_speech_music=3), None)]
    await lenient.close()
    meta = [e.chunk for e in events if e.WhichOneof("event") == "chunk"][-1].metadata
    assert len(meta.guard_attempts) == 1 and not meta.guard_attempts[0].rejected and meta.seed == 4


async def test_a_long_loop_streams_its_windows_and_loops_as_a_whole(long_audio):
    servicer, backend = long_audio
    backend.calls.clear()
    events = [e async for e in servicer.GenerateAudio(request(31.0, loop=True), None)]
    chunks = [e.chunk for e in events if e.WhichOneof("event") == "chunk"]
    wave = audio_encoding.decode_payloads([c.data for c in chunks], chunks[0].encoding)
    meta = chunks[-1].metadata
    assert meta.window_count == len(backend.calls) == 2 and all(w is not None for w, _ in backend.calls)
    assert (meta.loop_start_sample, meta.loop_end_sample) == (0, len(wave)) and 31 * RATE - 160 <= len(wave) <= 31 * RATE
    (join,) = meta.window_join_samples  # moved by where the loop starts in what was generated
    plan = WindowPlan.for_clip(backend.window_shape(), 31 * RATE)
    assert plan.join_samples[0] - RATE // 2 - 160 <= join <= plan.join_samples[0] - RATE // 2
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds.index("chunk") < max(i for i, k in enumerate(kinds) if k == "progress")  # streamed before the end


async def test_a_long_clip_asked_at_48_khz_streams_before_its_last_window_and_is_the_clip_resampled_whole(long_audio):
    """Another rate no longer holds a long clip back: its windows stream as they are made, resampled piece by
    piece, and what arrives is exactly the clip at the model's rate resampled in one go (float32 on the wire)."""
    from i2s_formats import loudness

    servicer, _ = long_audio
    as_float = {"encoding": common_pb2.AUDIO_ENCODING_FLOAT32_LE, "seed": 11}
    at_model = [e async for e in servicer.GenerateAudio(request(31.0, **as_float), None)]
    events = [e async for e in servicer.GenerateAudio(request(31.0, sample_rate_hertz=48000, **as_float), None)]
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds.index("chunk") < max(i for i, k in enumerate(kinds) if k == "progress")  # streamed before the end

    def wave(evs):
        chunks = [e.chunk for e in evs if e.WhichOneof("event") == "chunk"]
        return audio_encoding.decode_payloads([c.data for c in chunks], chunks[0].encoding), chunks

    model_wave, _ = wave(at_model)
    wave_48k, chunks = wave(events)
    np.testing.assert_array_equal(wave_48k, loudness.resample(model_wave, RATE, 48000))
    meta = chunks[-1].metadata
    assert meta.sample_rate_hertz == 48000 and all(c.sample_rate_hertz == 48000 for c in chunks)
    assert meta.num_samples == len(wave_48k) and meta.window_count == 2


async def test_a_loop_asked_at_48_khz_is_sent_at_that_rate_with_its_points_there(long_audio):
    servicer, _ = long_audio
    events = [e async for e in servicer.GenerateAudio(request(3.0, loop=True, sample_rate_hertz=48000), None)]
    chunks = [e.chunk for e in events if e.WhichOneof("event") == "chunk"]
    meta = chunks[-1].metadata
    wave = audio_encoding.decode_payloads([c.data for c in chunks], chunks[0].encoding)
    assert meta.sample_rate_hertz == 48000 and all(c.sample_rate_hertz == 48000 for c in chunks)
    assert len(wave) == meta.num_samples and 3 * 48000 - 480 <= meta.num_samples <= 3 * 48000
    assert (meta.loop_start_sample, meta.loop_end_sample) == (0, meta.num_samples)
    assert meta.HasField("loudness_lufs") or meta.HasField("peak_dbfs") or np.abs(wave).max() == 0


async def test_windows_of_two_long_clips_share_backend_calls_and_each_continues_its_own(long_audio):
    import asyncio

    _, backend = long_audio
    together = AudioServicer(backend, AudioConfig(model="x", max_batch_size=2, max_wait_ms=60_000))  # full batches
    backend.calls.clear()

    async def clip(seed):
        return [e async for e in together.GenerateAudio(request(31.0, seed=seed), None)]

    a, b = await asyncio.gather(clip(21), clip(22))
    await together.close()
    assert [len(windows) for windows, _ in backend.calls] == [2, 2]  # window 1 of both, then window 2 of both
    (first_windows, first), (second_windows, second) = backend.calls
    assert all(w.context is None for w in first_windows) and all(w.context is not None for w in second_windows)
    overlap = second_windows[0].overlap_frames
    # Each clip's second window is held to its own first window's latent (rows may come in either order).
    held = [[np.array_equal(s.latent[:, :overlap], f.latent[:, -overlap:]) for f in first] for s in second]
    assert sorted(map(tuple, held)) == [(False, True), (True, False)]
    assert not np.array_equal(first[0].latent, first[1].latent)
    for events in (a, b):
        assert [e.chunk for e in events if e.WhichOneof("event") == "chunk"][-1].metadata.window_count == 2
