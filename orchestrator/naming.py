"""File names the seed's outputs use: filesystem-safe, stable, short."""
from __future__ import annotations

import re
import unicodedata

_UNSAFE = re.compile(r"[^a-z0-9]+")


def safe_name(text: str, max_length: int = 40) -> str:
    """'Rain on a tin roof!' -> 'rain_on_a_tin_roof' (ASCII, lowercase, no separators at the ends)."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    name = _UNSAFE.sub("_", ascii_text).strip("_")[:max_length].rstrip("_")
    return name or "sound"


def clip_file_name(index: int, source_name: str, action: str) -> str:
    """The seed's clip name: NN_<source>_<action>.wav, NN counting from 01."""
    return f"{index:02d}_{safe_name(source_name)}_{safe_name(action)}.wav"
