"""Audio bytes: encoding a waveform into AudioChunk payloads, decoding them back, writing WAV files."""
from __future__ import annotations

import io
from typing import Iterator, Sequence

import numpy as np

from image_to_sound.v1 import common_pb2

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
    """Splits a clip into chunk payloads: raw encodings every `chunk_seconds`, whole files by size."""
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


def decode_payloads(payloads: Sequence[bytes], encoding: int) -> np.ndarray:
    """Reassembles the chunks of one clip into float32 samples in [-1, 1]."""
    blob = b"".join(payloads)
    if encoding == PCM16 or encoding == common_pb2.AUDIO_ENCODING_UNSPECIFIED:
        return np.frombuffer(blob, dtype="<i2").astype(np.float32) / 32767.0
    if encoding == FLOAT32:
        return np.frombuffer(blob, dtype="<f4").astype(np.float32)
    import soundfile as sf

    data, _ = sf.read(io.BytesIO(blob), dtype="float32")
    return data
