"""The bad-input catalogue: one table, input -> expected gRPC status and message fragment.

Each row names what it varies (`field`): an image, decoding or audio settings, pipeline options, a prompt,
a request id or a hand-made description. tests/integration/test_bad_input_catalogue.py sends every row to
every public RPC that takes that field. `code` OK rows are inputs that must be accepted (and cleaned).
"""
from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Callable

import grpc

from image_to_sound.v1 import common_pb2, orchestrator_pb2 as pb
from tests.fake_services import scripted_description

OK, INVALID, EXHAUSTED = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED
NAN, INF = float("nan"), float("inf")


@dataclass(frozen=True)
class Case:
    name: str
    field: str  # image | decoding | audio | options | prompt | request_id | description
    make: Callable[[], Any]
    code: grpc.StatusCode
    fragment: str = ""  # in the message of an error; unused for OK rows


def _save(size=(64, 48), mode="RGB", fmt="PNG", color=None, **kwargs) -> bytes:
    from PIL import Image

    image = Image.new(mode, size, color if color is not None else (40,) * len(mode))
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _animated_webp() -> bytes:
    from PIL import Image

    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="WEBP", save_all=True, append_images=frames[1:], duration=100)
    return buf.getvalue()


def _pixel_bomb() -> bytes:
    """A small PNG whose header declares 100000 x 100000 pixels (CRC fixed, so only the size is wrong)."""
    data = bytearray(_save((8, 8)))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", 100_000, 100_000)
    crc = zlib.crc32(bytes(data[ihdr:ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def _sixteen_bit() -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def _description(**change) -> common_pb2.SceneDescription:
    description = scripted_description(sources=1, variants=1)
    variant = description.sources[0].variants[0]
    for key, value in change.items():
        if key == "name":
            description.sources[0].name = value
        elif key == "location":
            description.sources[0].location.CopyFrom(value)
        else:
            setattr(variant, key, value)
    return description


def _box(x0, y0, x1, y1) -> common_pb2.BoundingBox:
    return common_pb2.BoundingBox(x_min=x0, y_min=y0, x_max=x1, y_max=y1)


def _many_sources(n: int) -> common_pb2.SceneDescription:
    description = common_pb2.SceneDescription(scene="a market")
    for i in range(n):
        description.sources.add(id=f"s{i}", name="bell").variants.add(id=f"s{i}v1", action="rings")
    return description


CATALOGUE: list[Case] = [
    # images: (data, mime_type)
    Case("empty image", "image", lambda: (b"", ""), INVALID, "image.data is empty"),
    Case("garbage bytes", "image", lambda: (b"\x00garbage" * 64, ""), INVALID, "not an image"),
    Case("truncated PNG", "image", lambda: (_save((256, 256), color=(1, 2, 3))[:200], "image/png"), INVALID, "truncated or corrupt"),
    Case("PNG sent as JPEG", "image", lambda: (_save(), "image/jpeg"), INVALID, "mime_type says image/jpeg"),
    Case("unknown MIME type", "image", lambda: (_save(), "text/html"), INVALID, "unsupported mime_type 'text/html'"),
    Case("64 KB MIME type", "image", lambda: (_save(), "image/" + "x" * 65536), INVALID, "mime_type is 65542 characters"),
    Case("GIF", "image", lambda: (_save(mode="P", fmt="GIF", color=1), ""), INVALID, "unsupported image format GIF"),
    Case("TIFF", "image", lambda: (_save(fmt="TIFF"), ""), INVALID, "unsupported image format TIFF"),
    Case("animated WebP", "image", lambda: (_animated_webp(), "image/webp"), INVALID, "animated (3 frames)"),
    Case("1x1 image", "image", lambda: (_save((1, 1)), ""), INVALID, "at least 8"),
    Case("extreme aspect 2000x8", "image", lambda: (_save((2000, 8)), ""), INVALID, "aspect ratio"),
    Case("pixel bomb in the header", "image", lambda: (_pixel_bomb(), "image/png"), INVALID, "pixels"),
    Case("image over 20 MB", "image", lambda: (b"\x89PNG" + bytes(21 * 1024 * 1024), ""), INVALID, "the limit is"),
    Case("message over 32 MiB", "image", lambda: (bytes(33 * 1024 * 1024), ""), EXHAUSTED, "larger than max"),
    Case("still WebP", "image", lambda: (_save(fmt="WEBP"), "image/webp"), OK),
    Case("16-bit grey PNG", "image", lambda: (_sixteen_bit(), "image/png"), OK),
    Case("CMYK JPEG", "image", lambda: (_save(mode="CMYK", fmt="JPEG", color=(0, 80, 160, 0)), "image/jpeg"), OK),
    Case("RGBA PNG", "image", lambda: (_save(mode="RGBA", color=(10, 20, 30, 0)), "image/png"), OK),
    # decoding settings
    Case("temperature NaN", "decoding", lambda: common_pb2.DecodingSettings(temperature=NAN), INVALID, "temperature"),
    Case("temperature +inf", "decoding", lambda: common_pb2.DecodingSettings(temperature=INF), INVALID, "temperature"),
    Case("top_p -inf", "decoding", lambda: common_pb2.DecodingSettings(top_p=-INF), INVALID, "top_p"),
    Case("top_p negative", "decoding", lambda: common_pb2.DecodingSettings(top_p=-0.5), INVALID, "top_p"),
    Case("max_new_tokens huge", "decoding", lambda: common_pb2.DecodingSettings(max_new_tokens=2**32 - 1), INVALID, "max_new_tokens"),
    # audio settings
    Case("duration NaN", "audio", lambda: common_pb2.AudioSettings(duration_seconds=NAN), INVALID, "duration_seconds"),
    Case("duration +inf", "audio", lambda: common_pb2.AudioSettings(duration_seconds=INF), INVALID, "duration_seconds"),
    Case("duration negative", "audio", lambda: common_pb2.AudioSettings(duration_seconds=-4), INVALID, "duration_seconds"),
    Case("duration huge", "audio", lambda: common_pb2.AudioSettings(duration_seconds=1e30), INVALID, "duration_seconds"),
    Case("duration over 5 minutes", "audio", lambda: common_pb2.AudioSettings(duration_seconds=300.5), INVALID, "within 1..300"),
    Case("loop on a 1.5 s clip", "audio", lambda: common_pb2.AudioSettings(duration_seconds=1.5, loop=True), INVALID, "loop needs a clip of at least 2 s"),
    Case("speech/music retries huge", "audio", lambda: common_pb2.AudioSettings(reject_speech_music=2**32 - 1), INVALID, "reject_speech_music"),
    Case("guidance -inf", "audio", lambda: common_pb2.AudioSettings(guidance_scale=-INF), INVALID, "guidance_scale"),
    Case("steps huge", "audio", lambda: common_pb2.AudioSettings(num_inference_steps=2**31 - 1), INVALID, "num_inference_steps"),
    Case("candidates huge", "audio", lambda: common_pb2.AudioSettings(num_candidates=10**6), INVALID, "num_candidates"),
    Case("scheduler enum 99", "audio", lambda: common_pb2.AudioSettings(scheduler=99), INVALID, "scheduler=99"),
    Case("encoding enum 99", "audio", lambda: common_pb2.AudioSettings(encoding=99), INVALID, "encoding=99"),
    Case("chunk duration NaN", "audio", lambda: common_pb2.AudioSettings(chunk_duration_seconds=NAN), INVALID, "chunk_duration_seconds"),
    Case("sample rate 22050", "audio", lambda: common_pb2.AudioSettings(sample_rate_hertz=22050), INVALID, "sample_rate_hertz=22050 is not supported"),
    Case("sample rate 2^32-1", "audio", lambda: common_pb2.AudioSettings(sample_rate_hertz=2**32 - 1), INVALID, "sample_rate_hertz"),
    Case("loudness target -80", "audio", lambda: common_pb2.AudioSettings(loudness_target_lufs=-80), INVALID, "loudness_target_lufs=-80"),
    Case("loudness target +3", "audio", lambda: common_pb2.AudioSettings(loudness_target_lufs=3), INVALID, "within -70..0"),
    Case("loudness target NaN", "audio", lambda: common_pb2.AudioSettings(loudness_target_lufs=NAN), INVALID, "loudness_target_lufs=nan"),
    Case("loudness target -inf", "audio", lambda: common_pb2.AudioSettings(loudness_target_lufs=-INF), INVALID, "loudness_target_lufs=-inf"),
    Case("48 kHz at -14 LUFS", "audio", lambda: common_pb2.AudioSettings(sample_rate_hertz=48000, loudness_target_lufs=-14), OK),
    # pipeline options
    Case("max_clips 2^32-1", "options", lambda: {"max_clips": 2**32 - 1}, INVALID, "at most 32 per image"),
    Case("priority enum 7", "options", lambda: {"priority": 7}, INVALID, "options.priority=7 is not a known priority"),
    # prompts (GenerateAudio)
    Case("empty prompt", "prompt", lambda: "", INVALID, "prompt must be a non-empty string"),
    Case("control characters only", "prompt", lambda: "\x00\x01\x1b\x7f\u200b\u202e\n\t ", INVALID, "no printable characters"),
    Case("megabyte prompt", "prompt", lambda: "rain " * 200_000, INVALID, "at most 2000 are accepted"),
    # request ids (orchestrator): accepted, echoed cleaned and bounded
    Case("NUL and newline in request id", "request_id", lambda: "img\x00\nINFO forged log line", OK),
    Case("megabyte request id", "request_id", lambda: "r" * 1_000_000, OK),
    Case("path-like request id", "request_id", lambda: "../../etc/passwd", OK),
    # hand-made descriptions (orchestrator)
    Case("description without sources", "description", lambda: common_pb2.SceneDescription(scene="x"), INVALID, "no sound sources"),
    Case("ten thousand sources", "description", lambda: _many_sources(10_000), INVALID, "at most 64"),
    Case("confidence NaN", "description", lambda: _description(confidence=NAN), INVALID, "confidence=nan"),
    Case("confidence +inf", "description", lambda: _description(confidence=INF), INVALID, "confidence=inf"),
    Case("confidence -5", "description", lambda: _description(confidence=-5), INVALID, "confidence=-5"),
    Case("instrument role 99", "description", lambda: _description(instrument_role=99), INVALID, "instrument_role=99"),
    Case("location NaN", "description", lambda: _description(location=common_pb2.BoundingBox(x_min=NAN)), INVALID, "location"),
    Case("location +inf", "description", lambda: _description(location=_box(0.1, 0.1, INF, 0.5)), INVALID, "location must be finite"),
    Case("location out of range", "description", lambda: _description(location=_box(0.1, 0.1, 1.5, 0.5)), INVALID, "within 0..1"),
    Case("location negative", "description", lambda: _description(location=_box(-0.2, 0.1, 0.5, 0.5)), INVALID, "within 0..1"),
    Case("location inverted", "description", lambda: _description(location=_box(0.8, 0.1, 0.2, 0.5)), INVALID, "x_min < x_max"),
    Case("location empty", "description", lambda: _description(location=_box(0.3, 0.5, 0.6, 0.5)), INVALID, "y_min < y_max"),
    Case("location in range", "description", lambda: _description(location=_box(0.1, 0.2, 0.3, 0.4)), OK),
    Case("source name ../../etc", "description", lambda: _description(name="../../etc/passwd"), OK),
    Case("source name CON", "description", lambda: _description(name="CON"), OK),
    Case("source name NUL", "description", lambda: _description(name="NUL"), OK),
    Case("megabyte unicode source name", "description", lambda: _description(name="日本語の鐘" * 200_000), OK),
]


def set_field(request: pb.ImageToSoundRequest, case: Case, value) -> pb.ImageToSoundRequest:
    """`request` with the row's field set to `value` (an orchestrator request carries every field)."""
    if case.field == "image":
        request.image.data, request.image.mime_type = value
    elif case.field == "decoding":
        request.decoding.CopyFrom(value)
    elif case.field == "audio":
        request.audio.CopyFrom(value)
    elif case.field == "options":
        request.options.MergeFrom(pb.PipelineOptions(**value))
    elif case.field == "request_id":
        request.request_id = value
    elif case.field == "description":
        request.description.CopyFrom(value)
    return request
