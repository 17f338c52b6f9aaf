"""Audio bytes: a waveform as the AudioChunk messages of one stream, the payloads decoded back, and a
waveform as a WAV file that keeps the PCM 16-bit samples of a stream exactly."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from image_to_sound.v1 import common_pb2
from serving.atomic_files import atomic_path

PCM16 = common_pb2.AUDIO_ENCODING_PCM_S16LE
FLOAT32 = common_pb2.AUDIO_ENCODING_FLOAT32_LE
WAV = common_pb2.AUDIO_ENCODING_WAV
FLAC = common_pb2.AUDIO_ENCODING_FLAC
RAW_ENCODINGS = (PCM16, FLOAT32)
# Whole files are split into transport chunks of this size.
FILE_CHUNK_BYTES = 256 * 1024


def to_pcm16(waveform: np.ndarray) -> bytes:
    """Float samples in [-1, 1] to signed 16-bit little-endian PCM (clipped, rounded)."""
    clipped = np.clip(np.asarray(waveform, dtype=np.float32), -1.0, 1.0)
    return np.round(clipped * 32767.0).astype("<i2").tobytes()


def encode_file(waveform: np.ndarray, sample_rate: int, encoding: int) -> bytes:
    """A whole WAV (PCM 16-bit) or FLAC file in memory."""
    import soundfile as sf

    buf = io.BytesIO()
    fmt, subtype = ("WAV", "PCM_16") if encoding == WAV else ("FLAC", "PCM_16")
    sf.write(buf, np.clip(waveform, -1.0, 1.0), sample_rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def chunk_payloads(
    waveform: np.ndarray, sample_rate: int, encoding: int, chunk_seconds: float
) -> Iterator[bytes]:
    """Splits a clip into chunk payloads: raw encodings every `chunk_seconds`, whole files by size. A
    stereo clip is (frames, 2): raw payloads interleave left and right."""
    if encoding in RAW_ENCODINGS:
        step = max(1, int(round(chunk_seconds * sample_rate)))
        for start in range(0, len(waveform), step):
            piece = waveform[start : start + step]
            yield to_pcm16(piece) if encoding == PCM16 else np.asarray(piece, dtype="<f4").tobytes()
        if len(waveform) == 0:
            yield b""
        return
    blob = encode_file(waveform, sample_rate, encoding)
    for start in range(0, len(blob), FILE_CHUNK_BYTES):
        yield blob[start : start + FILE_CHUNK_BYTES]


def audio_chunks(
    clip_id: str,
    waveform: np.ndarray,
    sample_rate: int,
    encoding: int,
    chunk_seconds: float,
    metadata: common_pb2.ClipMetadata | None = None,
) -> Iterator[common_pb2.AudioChunk]:
    """One clip, mono (frames,) or stereo (frames, 2), as the AudioChunk messages of a stream: numbered from
    0, each carrying its rate, channels and encoding; the last one is marked `last` and carries `metadata`.
    Every service streams clips this way."""
    channels = 1 if np.ndim(waveform) == 1 else int(np.shape(waveform)[1])
    payloads = list(chunk_payloads(waveform, sample_rate, encoding, chunk_seconds))
    for seq, data in enumerate(payloads):
        last = seq == len(payloads) - 1
        yield common_pb2.AudioChunk(
            clip_id=clip_id, sequence_number=seq, sample_rate_hertz=sample_rate, channels=channels, encoding=encoding,
            data=data, last=last, metadata=metadata if last else None,
        )


def decode_payloads(payloads: Sequence[bytes], encoding: int, channels: int = 1) -> np.ndarray:
    """Reassembles the chunks of one clip into float32 samples in [-1, 1]: (frames,) for mono, (frames,
    channels) otherwise."""
    blob = b"".join(payloads)
    if encoding == PCM16 or encoding == common_pb2.AUDIO_ENCODING_UNSPECIFIED:
        samples = np.frombuffer(blob, dtype="<i2").astype(np.float32) / 32767.0
        return samples if channels == 1 else samples.reshape(-1, channels)
    if encoding == FLOAT32:
        samples = np.frombuffer(blob, dtype="<f4").astype(np.float32)
        return samples if channels == 1 else samples.reshape(-1, channels)
    import soundfile as sf

    data, _ = sf.read(io.BytesIO(blob), dtype="float32")
    return data


def write_wav(path: str | os.PathLike, waveform: np.ndarray, sample_rate: int,
              loop: tuple[int, int] | None = None) -> Path:
    """Writes a mono (frames,) or stereo (frames, 2) PCM 16-bit WAV at `sample_rate`
    atomically. Samples are quantised as the audio service
    streams them (to_pcm16 above), so a PCM 16-bit stream saved here keeps every sample exactly
    (libsndfile's own float conversion scales by 32768 and would move many by one step). `loop` ([start,
    end) sample offsets) goes into the file's sampler chunk (i2s_formats/wav_loop_points.py)."""
    import soundfile as sf

    if np.ndim(waveform) != 1 and not (np.ndim(waveform) == 2 and np.shape(waveform)[1] == 2):
        raise ValueError(f"a waveform is (frames,) or (frames, 2), not the shape {np.shape(waveform)}")
    with atomic_path(path) as tmp:
        samples = np.frombuffer(to_pcm16(waveform), dtype="<i2").reshape(np.shape(waveform))
        sf.write(tmp, samples, sample_rate, format="WAV", subtype="PCM_16")
        if loop is not None:
            from i2s_formats.wav_loop_points import add_loop_points

            Path(tmp).write_bytes(add_loop_points(Path(tmp).read_bytes(), loop[0], loop[1], sample_rate))
    return Path(path)


def read_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """A PCM 16-bit WAV as written by write_wav, back as the float samples it was written from (the same
    1/32767 scale as decode_payloads): (frames,) mono or (frames, channels), and its rate."""
    import soundfile as sf

    data, rate = sf.read(path, dtype="int16")
    return data.astype(np.float32) / 32767.0, int(rate)
