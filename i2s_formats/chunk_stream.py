"""A clip's AudioChunk messages made while the clip is still being made (long clips stream by window).

`ChunkStream` gives exactly the messages `audio_encoding.audio_chunks` gives for the whole clip, whatever
pieces the samples arrive in: raw encodings go out every `chunk_seconds` as soon as a chunk is complete
and one more sample exists (so the last chunk, which carries the metadata, is never sent early); whole
files (WAV, FLAC) need the whole clip, so they go out at `finish`.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from i2s_formats import audio_encoding
from image_to_sound.v1 import common_pb2

__all__ = ["ChunkStream"]


class ChunkStream:
    def __init__(self, clip_id: str, sample_rate: int, encoding: int, chunk_seconds: float):
        self.clip_id, self.sample_rate, self.encoding = clip_id, int(sample_rate), encoding
        self.chunk_seconds = chunk_seconds
        self._step = max(1, int(round(chunk_seconds * sample_rate)))
        self._pending: list[np.ndarray] = []
        self._pending_len = 0
        self.sent_chunks = 0
        self.total_samples = 0

    def _chunk(self, data: bytes, last: bool = False, metadata: common_pb2.ClipMetadata | None = None) -> common_pb2.AudioChunk:
        chunk = common_pb2.AudioChunk(
            clip_id=self.clip_id, sequence_number=self.sent_chunks, sample_rate_hertz=self.sample_rate, channels=1,
            encoding=self.encoding, data=data, last=last, metadata=metadata if last else None)
        self.sent_chunks += 1
        return chunk

    def add(self, samples: np.ndarray) -> Iterator[common_pb2.AudioChunk]:
        """The chunks that are complete once `samples` (the clip's next samples) are in."""
        samples = np.asarray(samples, dtype=np.float32)
        self.total_samples += len(samples)
        if len(samples):
            self._pending.append(samples)
            self._pending_len += len(samples)
        if self.encoding not in audio_encoding.RAW_ENCODINGS or self._pending_len <= self._step:
            return
        pending = np.concatenate(self._pending)
        ready = (len(pending) - 1) // self._step * self._step  # keep at least one sample back
        for payload in audio_encoding.chunk_payloads(pending[:ready], self.sample_rate, self.encoding, self.chunk_seconds):
            yield self._chunk(payload)
        self._pending = [pending[ready:]]
        self._pending_len = len(pending) - ready

    def finish(self, metadata: common_pb2.ClipMetadata | None = None) -> Iterator[common_pb2.AudioChunk]:
        """The remaining chunks, the last marked and carrying `metadata`."""
        pending = np.concatenate(self._pending) if self._pending else np.zeros(0, np.float32)
        self._pending, self._pending_len = [], 0
        payloads = list(audio_encoding.chunk_payloads(pending, self.sample_rate, self.encoding, self.chunk_seconds))
        for i, payload in enumerate(payloads):
            yield self._chunk(payload, last=i == len(payloads) - 1, metadata=metadata)
