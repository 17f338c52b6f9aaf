"""Checks every image before it reaches a model: clear INVALID_ARGUMENT errors instead of crashes."""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from serving.errors import InvalidInput, excerpt

MAX_MIME_CHARS = 128  # "image/jpeg" is 10; anything this long is not a MIME type

# Formats we accept, by Pillow's name; the MIME types map onto them.
FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "BMP": "image/bmp", "WEBP": "image/webp"}
MIME_ALIASES = {"image/jpg": "image/jpeg", "image/x-ms-bmp": "image/bmp", "image/x-png": "image/png"}


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024
    # Pixels, checked from the header before decoding (decompression bombs). The model resizes anyway.
    max_pixels: int = 40_000_000
    min_side: int = 8
    # The one aspect-ratio limit. Qwen2.5-VL's smart_resize refuses ratios over 200 (a ValueError deep in the
    # processor), measured after the backend's own downscale rounds each side to 28-pixel patches: 100 keeps
    # that rounding inside 200, and a 100:1 strip is already one patch row tall.
    max_aspect_ratio: float = 100.0


def check_declared(data: bytes, mime_type: str = "", limits: ImageLimits = ImageLimits()) -> str:
    """The checks that need no decoding (size, declared type), cheap enough for the orchestrator to run
    before any work starts. Returns the declared MIME type, normalised ('' when none was given)."""
    if not data:
        raise InvalidInput("image.data is empty")
    if len(data) > limits.max_bytes:
        raise InvalidInput(f"image is {len(data)} bytes; the limit is {limits.max_bytes}")
    if len(mime_type) > MAX_MIME_CHARS:
        raise InvalidInput(f"mime_type is {len(mime_type)} characters; use one of {sorted(FORMATS.values())}")
    declared = MIME_ALIASES.get(mime_type.lower().strip(), mime_type.lower().strip())
    if declared and declared not in FORMATS.values():
        raise InvalidInput(f"unsupported mime_type {excerpt(mime_type)}; use one of {sorted(FORMATS.values())}")
    return declared


def _open_checked(data: bytes, mime_type: str, limits: ImageLimits):
    """Opens `data` and checks everything its header says (format, declared type, pixels, sides, aspect
    ratio, frames) without decoding the pixels. Returns the opened image."""
    from PIL import Image, UnidentifiedImageError

    declared = check_declared(data, mime_type, limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            fmt = image.format or ""
            if fmt not in FORMATS:
                raise InvalidInput(f"unsupported image format {fmt or 'unknown'}; use JPEG, PNG, BMP or WebP")
            width, height = image.size
            if width * height > limits.max_pixels:
                raise InvalidInput(
                    f"image is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels}"
                )
            if min(width, height) < limits.min_side:
                raise InvalidInput(f"image is {width}x{height}; each side must be at least {limits.min_side}")
            if max(width, height) > limits.max_aspect_ratio * min(width, height):
                raise InvalidInput(f"image is {width}x{height}; the aspect ratio may be at most {limits.max_aspect_ratio:g}:1")
            if getattr(image, "n_frames", 1) > 1:
                raise InvalidInput(f"image is animated ({image.n_frames} frames); send one still frame")
    except InvalidInput:
        raise
    except UnidentifiedImageError:
        raise InvalidInput("image.data is not an image Pillow can read (JPEG, PNG, BMP or WebP expected)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidInput("image has too many pixels to decode safely (decompression bomb check)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidInput(f"image.data is truncated or corrupt: {exc}") from None
    if declared and FORMATS[fmt] != declared:
        raise InvalidInput(f"mime_type says {declared} but the bytes are {FORMATS[fmt]}")
    return image


def check_image(data: bytes, mime_type: str = "", limits: ImageLimits = ImageLimits()) -> None:
    """Every check `decode_image` makes except decoding the pixels (a truncated file passes): cheap enough
    for the orchestrator to refuse a bad image before any work starts."""
    _open_checked(data, mime_type, limits)


def decode_image(data: bytes, mime_type: str = "", limits: ImageLimits = ImageLimits()):
    """Decodes `data` into an RGB PIL image or raises InvalidInput saying what is wrong."""
    image = _open_checked(data, mime_type, limits)
    try:
        image.load()  # truncated or corrupt files fail here, not later inside the model
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidInput(f"image.data is truncated or corrupt: {exc}") from None
    return to_rgb(image)


def to_rgb(image):
    """RGB for the model: 16-bit and 32-bit grey scaled to 8 bits (a plain convert clips them to white),
    transparency composited on white (a plain convert turns transparent pixels black)."""
    from PIL import Image

    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        import numpy as np

        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(values / top * 255.0, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


# File name extensions of the formats above (what the command line looks for in a folder).
EXTENSIONS = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".bmp": "image/bmp",
              ".webp": "image/webp"}


def mime_type_for(path: str) -> str:
    """The MIME type for an image file name (by extension), '' if unknown."""
    ext = "." + path.rsplit(".", 1)[-1].lower() if "." in path else ""
    return EXTENSIONS.get(ext, "")
