"""The audio service's entries in the result cache (serving.result_cache): which clips, under which key, as
which bytes.

Only a request whose caller chose the seed is cached (a seedless request asks for a new sample). The key is
every field of the resolved request (caption, negative prompt, seed, steps, guidance, duration, scheduler,
candidates, loop, the speech/music guard's tries, and whatever option the request gains later: all decide
the samples), the output's rate and loudness target, the guard's margin when the guard is on, and the
backend's `result_identity()` (model id and revision, precision, device kind, duration buckets, and so the
window shape). The value is the clip's samples as sent (resampled and normalised) and its metadata: a hit is
encoded and chunked exactly as a fresh render is (a long, looped or guarded clip through the same
`ChunkStream` that streamed it), so it streams the same bytes, with `metadata.cache_hit` set.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from audio_service.backend import AudioBackend
from i2s_formats.contract import AudioCall
from image_to_sound.v1 import common_pb2
from serving.result_cache import content_key, pack, unpack


def clip_key(call: AudioCall, backend: AudioBackend, guard_margin: float) -> str | None:
    """The key of `call`'s clip, or None when it is not cached (no seed given, or revision unknown).
    `guard_margin`: the service's speech/music margin, which decides which tries a guarded clip keeps."""
    identity = backend.result_identity()
    if not call.seeded or identity is None:
        return None
    guard = {"guard_margin": guard_margin} if call.generation.reject_speech_music > 0 else {}
    # The output rate and loudness target change the samples sent; the encoding and chunk length do not.
    return content_key("audio", request=dataclasses.asdict(call.generation), rate=call.output.sample_rate_hertz,
                       loudness_target=call.output.loudness_target_lufs, **guard, **identity)


def pack_clip(samples: np.ndarray, metadata: common_pb2.ClipMetadata) -> bytes:
    """The samples in their own dtype (what was encoded), so a hit encodes exactly the same values."""
    samples = np.ascontiguousarray(samples)
    return pack([metadata.SerializeToString(), samples.dtype.str.encode(), samples.tobytes()])


def unpack_clip(value: bytes) -> tuple[np.ndarray, common_pb2.ClipMetadata]:
    """The samples and the metadata of a cached clip, marked as a hit."""
    meta_bytes, dtype, samples = unpack(value)
    metadata = common_pb2.ClipMetadata.FromString(meta_bytes)
    metadata.cache_hit = True
    return np.frombuffer(samples, dtype=np.dtype(dtype.decode())), metadata
