"""Loop points in a WAV file's sampler chunk (`smpl`), which samplers and DAWs read to loop a file as written.

The chunk (RIFF/WAVE, as the MIDI Manufacturers Association's sampler chunk defines it): nine 32-bit
little-endian header fields (manufacturer, product, sample period in ns, MIDI unity note, pitch fraction,
SMPTE format and offset, loop count, sampler data size) and then one 24-byte record per loop (cue id,
type 0 = forward, start, end, fraction, play count 0 = forever). Start and end are sample offsets and the
end is the loop's LAST sample (inclusive); here loop points are [start, end) as in ClipMetadata.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

__all__ = ["add_loop_points", "read_loop_points"]

_UNITY_NOTE = 60  # middle C: no transposition


def _chunks(data: bytes):
    """(id, offset of the payload, payload size) of each chunk of a RIFF/WAVE file."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("not a RIFF/WAVE file")
    at = 12
    while at + 8 <= len(data):
        cid, size = data[at : at + 4], struct.unpack("<I", data[at + 4 : at + 8])[0]
        yield cid, at + 8, size
        at += 8 + size + (size & 1)


def add_loop_points(data: bytes, start: int, end: int, sample_rate: int) -> bytes:
    """The WAV file `data` with a `smpl` chunk for the forward loop [start, end) (any old one replaced)."""
    if not 0 <= start < end:
        raise ValueError(f"loop points must satisfy 0 <= start < end, got {start}, {end}")
    kept = b"".join(data[off - 8 : off + size + (size & 1)] for cid, off, size in _chunks(data) if cid != b"smpl")
    period_ns = int(round(1e9 / sample_rate))
    payload = struct.pack("<9I", 0, 0, period_ns, _UNITY_NOTE, 0, 0, 0, 1, 0)
    payload += struct.pack("<6I", 0, 0, start, end - 1, 0, 0)
    body = b"WAVE" + kept + b"smpl" + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


def read_loop_points(source: bytes | str | os.PathLike) -> tuple[int, int] | None:
    """The first loop of the file's `smpl` chunk as [start, end), or None when it has none."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    for cid, off, size in _chunks(data):
        if cid == b"smpl" and size >= 36 + 24:
            loops = struct.unpack("<I", data[off + 28 : off + 32])[0]
            if loops:
                start, last = struct.unpack("<2I", data[off + 44 : off + 52])
                return start, last + 1
    return None
