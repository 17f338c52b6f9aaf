"""Where a sound source is: a box normalised to the original image (x_min, y_min, x_max, y_max in 0..1,
origin top left, min < max), and the one conversion from the VLM's pixel frame to it.

Qwen2.5-VL grounds in absolute pixels of the image *after its own resize* (``smart_resize``: each side
rounded to a multiple of 28 within the pixel budget, the aspect ratio kept only approximately). The resize
scales each axis on its own, so a pixel x in a frame of width W is the fraction x / W of the original's
width whatever the original's size: the conversion needs only the resized frame, which the VLM knows from
the image grid it fed the model (grid cells x patch size).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from image_to_sound.v1 import common_pb2
from serving.errors import InvalidInput

# How the description file and the stems' export spell a box: [x_min, y_min, x_max, y_max], 0..1.
BOX_KEY = "box"
DECIMALS = 4  # 1/10000 of the image: finer than any model's grounding, short in files


@dataclass(frozen=True)
class PixelFrame:
    """The image as the model saw it: width and height in pixels after the processor's resize."""

    width: int
    height: int

    @classmethod
    def from_grid(cls, grid_thw: Sequence[int], patch_size: int = 14) -> "PixelFrame":
        """The frame of Qwen2.5-VL's ``image_grid_thw`` row (t, h, w patches of ``patch_size`` pixels)."""
        _, h, w = (int(v) for v in grid_thw)
        return cls(width=w * patch_size, height=h * patch_size)


def box_error(corners: Sequence[float]) -> str | None:
    """What is wrong with four normalised corners, or None when they make a box."""
    if len(corners) != 4:
        return f"needs 4 numbers (x_min, y_min, x_max, y_max), got {len(corners)}"
    if not all(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) for c in corners):
        return "must be finite numbers"
    if not all(0.0 <= c <= 1.0 for c in corners):
        return "must lie within 0..1 of the image"
    x0, y0, x1, y1 = corners
    if not (x0 < x1 and y0 < y1):
        return "must have x_min < x_max and y_min < y_max"
    return None


def check_location(box: common_pb2.BoundingBox, where: str) -> None:
    """InvalidInput (naming ``where``) unless ``box`` is a normalised box: for descriptions sent in."""
    problem = box_error((box.x_min, box.y_min, box.x_max, box.y_max))
    if problem:
        raise InvalidInput(f"{where}.location {problem}")


def from_model_pixels(raw: Any, frame: PixelFrame) -> common_pb2.BoundingBox | None:
    """The model's [x0, y0, x1, y1] in ``frame`` pixels → a normalised box of the original image.
    Corners are clamped into the frame and put in order; a box with no width or height grows to one
    pixel of the frame (so it is always a valid box). None when ``raw`` is not four finite numbers (the
    grammar makes that rare)."""
    if not isinstance(raw, (list, tuple)) or len(raw) != 4:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in raw):
        return None
    xs = sorted(min(max(float(v), 0.0), frame.width) for v in (raw[0], raw[2]))
    ys = sorted(min(max(float(v), 0.0), frame.height) for v in (raw[1], raw[3]))
    xs = _at_least_one_pixel(xs, frame.width)
    ys = _at_least_one_pixel(ys, frame.height)
    return to_location([xs[0] / frame.width, ys[0] / frame.height, xs[1] / frame.width, ys[1] / frame.height])


def _at_least_one_pixel(span: list[float], size: int) -> list[float]:
    """Widen a span to one pixel, and to more than 10^-DECIMALS of the side, so it stays a box when rounded."""
    lo, hi = span
    least = max(1.0, size * 1.01 * 10.0**-DECIMALS)
    if hi - lo >= least:
        return span
    lo = min(lo, size - least)
    return [lo, lo + least]


def to_location(corners: Sequence[float]) -> common_pb2.BoundingBox:
    """A BoundingBox from [x0, y0, x1, y1] in 0..1, rounded to DECIMALS (as the file stores it), so a box
    reads back from the file, the export or JSON lines as exactly what the proto held."""
    x0, y0, x1, y1 = (round(float(c), DECIMALS) for c in corners)
    return common_pb2.BoundingBox(x_min=x0, y_min=y0, x_max=x1, y_max=y1)


def to_list(box: common_pb2.BoundingBox) -> list[float]:
    """[x0, y0, x1, y1] as written to files: the float32 the proto holds, shown at DECIMALS."""
    return [round(float(c), DECIMALS) for c in (box.x_min, box.y_min, box.x_max, box.y_max)]


def location_from_file(raw: Any) -> common_pb2.BoundingBox | None:
    """A description file's ``box`` (normalised) → a BoundingBox, None when absent or not a valid box
    (files are read leniently, as the rest of the seed format: a bad box only loses the placement)."""
    if not isinstance(raw, (list, tuple)) or box_error(list(raw)) is not None:
        return None
    return to_location(raw)
