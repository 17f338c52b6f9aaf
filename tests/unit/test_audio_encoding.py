"""Audio bytes: chunking and reassembly for every encoding, WAV files written atomically."""
import numpy as np
import pytest
import soundfile as sf

from i2s_formats import audio_encoding as enc
from i2s_formats.audio_encoding import write_wav

RATE = 16000


@pytest.fixture
def wave() -> np.ndarray:
    t = np.arange(int(2.3 * RATE)) / RATE
    return (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


@pytest.mark.parametrize("encoding", [enc.PCM16, enc.FLOAT32, enc.WAV, enc.FLAC])
def test_chunks_reassemble_to_the_same_samples(wave, encoding):
    payloads = list(enc.chunk_payloads(wave, RATE, encoding, chunk_seconds=0.5))
    out = enc.decode_payloads(payloads, encoding)
    assert out.shape == wave.shape
    tolerance = 0 if encoding == enc.FLOAT32 else 1 / 32767 + 1e-6
    assert np.max(np.abs(out - wave)) <= tolerance


def test_raw_chunks_have_the_requested_duration(wave):
    payloads = list(enc.chunk_payloads(wave, RATE, enc.PCM16, chunk_seconds=0.5))
    assert len(payloads) == 5  # 2.3 s in 0.5 s chunks
    assert all(len(p) == 8000 * 2 for p in payloads[:-1])
    assert len(payloads[-1]) == int(0.3 * RATE) * 2


def test_pcm16_clips_out_of_range_samples():
    raw = enc.to_pcm16(np.array([2.0, -3.0, 0.0], dtype=np.float32))
    assert np.frombuffer(raw, "<i2").tolist() == [32767, -32767, 0]


def test_write_wav_is_pcm16_mono_and_leaves_no_temp_files(tmp_path, wave):
    path = write_wav(tmp_path / "sub" / "clip.wav", wave, RATE)
    info = sf.info(path)
    assert (info.samplerate, info.channels, info.subtype, info.frames) == (RATE, 1, "PCM_16", len(wave))
    assert [p.name for p in path.parent.iterdir()] == ["clip.wav"]


def test_interrupted_write_leaves_nothing(tmp_path):
    with pytest.raises(Exception):
        write_wav(tmp_path / "bad.wav", np.zeros((3, 3, 3), dtype=np.float32), RATE)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("encoding", [enc.PCM16, enc.WAV])
def test_audio_chunks_number_the_stream_and_mark_the_last(wave, encoding):
    metadata = enc.common_pb2.ClipMetadata(sample_rate_hertz=22050, num_samples=len(wave), prompt="rain")
    chunks = list(enc.audio_chunks("c1", wave, 22050, encoding, 0.5, metadata))
    assert [c.sequence_number for c in chunks] == list(range(len(chunks)))
    assert [c.last for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert [c.HasField("metadata") for c in chunks] == [c.last for c in chunks]
    assert chunks[-1].metadata == metadata
    assert all((c.clip_id, c.sample_rate_hertz, c.channels, c.encoding) == ("c1", 22050, 1, encoding) for c in chunks)
    out = enc.decode_payloads([c.data for c in chunks], encoding)
    assert out.shape == wave.shape and np.max(np.abs(out - wave)) <= 1 / 32767 + 1e-6


def test_an_empty_clip_is_one_last_chunk():
    (chunk,) = enc.audio_chunks("c0", np.zeros(0, dtype=np.float32), RATE, enc.PCM16, 0.5)
    assert chunk.last and chunk.sequence_number == 0 and chunk.data == b""


def test_a_pcm16_stream_saved_as_wav_keeps_every_sample(tmp_path):
    # Every 16-bit value but -32768 (the services quantise symmetrically), decoded as clients decode a
    # stream, then saved: the file holds the streamed samples exactly.
    import soundfile as sf

    streamed = np.arange(-32767, 32768, dtype="<i2")
    decoded = enc.decode_payloads([streamed.tobytes()], enc.PCM16)
    path = write_wav(tmp_path / "all.wav", decoded, RATE)
    saved, rate = sf.read(path, dtype="int16")
    assert rate == RATE and np.array_equal(saved, streamed)
