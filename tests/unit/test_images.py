"""Image checks: every kind of bad input gets INVALID_ARGUMENT with a message that says what is wrong."""
import io

import pytest
from PIL import Image

from serving.errors import InvalidInput
from serving.images import ImageLimits, decode_image


def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def png() -> bytes:
    return encode(Image.new("RGB", (64, 48), (200, 30, 30)), "PNG")


def test_valid_images_decode_to_rgb(png):
    gray = encode(Image.new("L", (40, 30), 128), "JPEG")
    assert decode_image(png, "image/png").size == (64, 48)
    out = decode_image(gray, "")
    assert out.mode == "RGB" and out.size == (40, 30)


@pytest.mark.parametrize(
    "data, mime, message",
    [
        (b"", "", "empty"),
        (b"definitely not an image" * 10, "", "not an image"),
        (None, "image/gif", "unsupported mime_type"),
        (None, "image/jpeg", "mime_type says image/jpeg"),
    ],
)
def test_bad_bytes_and_types(png, data, mime, message):
    with pytest.raises(InvalidInput, match=message):
        decode_image(png if data is None else data, mime)


def test_truncated_file(png):
    jpeg = encode(Image.effect_noise((256, 256), 60).convert("RGB"), "JPEG")
    with pytest.raises(InvalidInput, match="truncated or corrupt"):
        decode_image(jpeg[: len(jpeg) // 2], "image/jpeg")


def test_unsupported_format():
    gif = encode(Image.new("RGB", (32, 32)), "GIF")
    with pytest.raises(InvalidInput, match="unsupported image format GIF"):
        decode_image(gif)


def test_decompression_bomb_is_rejected_from_the_header():
    # A 1-bit PNG of 12000x12000 compresses to a few KB but would decode to 144 M pixels.
    bomb = encode(Image.new("1", (12000, 12000)), "PNG")
    assert len(bomb) < 100_000
    with pytest.raises(InvalidInput, match="too many pixels"):
        decode_image(bomb, "image/png", ImageLimits(max_pixels=40_000_000))
    # Below Pillow's own bomb threshold but above ours: our limit, with the numbers.
    big = encode(Image.new("1", (8000, 6000)), "PNG")
    with pytest.raises(InvalidInput, match="8000x6000 = 48000000 pixels; the limit is 40000000"):
        decode_image(big, "image/png", ImageLimits(max_pixels=40_000_000))


def test_too_many_bytes_and_too_small(png):
    with pytest.raises(InvalidInput, match="bytes; the limit"):
        decode_image(png, "", ImageLimits(max_bytes=100))
    tiny = encode(Image.new("RGB", (4, 4)), "PNG")
    with pytest.raises(InvalidInput, match="at least 8"):
        decode_image(tiny)
