"""The seed's description file format (design.md §3), read and written as SceneDescription messages.

    {"scene_description": str, "mood_description": str,
     "sound_sources": [{"name": str, "material": str,
        "variants": [{"play_method": str, "timbre": [str, ...],
                      "mapping_to_music_instrument": "guitar"|"bass"|"keyboard"|"drums"|"None",
                      "confidence": float}]}]}

Reading is tolerant of older files: `objects` instead of `sound_sources`, a missing confidence, an
instrument that is "None", null or absent, timbre as one comma-separated string.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

from image_to_sound.v1 import common_pb2

ROLE_BY_NAME = {
    "guitar": common_pb2.INSTRUMENT_ROLE_GUITAR,
    "bass": common_pb2.INSTRUMENT_ROLE_BASS,
    "keyboard": common_pb2.INSTRUMENT_ROLE_KEYBOARD,
    "keyboards": common_pb2.INSTRUMENT_ROLE_KEYBOARD,
    "piano": common_pb2.INSTRUMENT_ROLE_KEYBOARD,
    "drums": common_pb2.INSTRUMENT_ROLE_DRUMS,
    "drum": common_pb2.INSTRUMENT_ROLE_DRUMS,
    "percussion": common_pb2.INSTRUMENT_ROLE_DRUMS,
    "none": common_pb2.INSTRUMENT_ROLE_NONE,
}
NAME_BY_ROLE = {
    common_pb2.INSTRUMENT_ROLE_GUITAR: "guitar",
    common_pb2.INSTRUMENT_ROLE_BASS: "bass",
    common_pb2.INSTRUMENT_ROLE_KEYBOARD: "keyboard",
    common_pb2.INSTRUMENT_ROLE_DRUMS: "drums",
}
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
MAX_TEXT = 300


class SeedFormatError(ValueError):
    """The file is not a description in the seed's format (or one of its older variants)."""


def clean_text(value: Any, max_length: int = MAX_TEXT) -> str:
    """Control characters out, whitespace collapsed, length bounded: safe for prompts, protobuf, file names."""
    if value is None:
        return ""
    text = _CONTROL.sub(" ", str(value))
    return " ".join(text.split())[:max_length].strip()


def role_from_name(value: Any) -> int:
    """'drums' → INSTRUMENT_ROLE_DRUMS; 'None', null, '' → NONE; absent handled by the caller."""
    if value is None:
        return common_pb2.INSTRUMENT_ROLE_NONE
    return ROLE_BY_NAME.get(clean_text(value).lower(), common_pb2.INSTRUMENT_ROLE_NONE)


def _timbre(value: Any) -> list[str]:
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, list | tuple) else [value]
    return [t for t in (clean_text(item, 40) for item in items) if t][:8]


def _confidence(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number):
        return None
    return min(1.0, max(0.0, number))


def description_from_seed(data: dict) -> common_pb2.SceneDescription:
    """A seed-format dict (or an older variant of it) → SceneDescription with ids s1, s1v1, ..."""
    if not isinstance(data, dict):
        raise SeedFormatError("a description must be a JSON object")
    sources = data.get("sound_sources", data.get("objects"))
    if not isinstance(sources, list):
        raise SeedFormatError("no 'sound_sources' (or 'objects') list")
    description = common_pb2.SceneDescription(
        scene=clean_text(data.get("scene_description", data.get("scene", ""))),
        mood=clean_text(data.get("mood_description", data.get("mood", ""))),
    )
    for s_index, raw in enumerate((s for s in sources if isinstance(s, dict)), start=1):
        source = description.sources.add(id=f"s{s_index}", name=clean_text(raw.get("name"), 80),
                                         material=clean_text(raw.get("material"), 80))
        variants = raw.get("variants")
        if not isinstance(variants, list):
            variants = [raw]  # very old files put one variant's fields on the source itself
        for v_index, v in enumerate((v for v in variants if isinstance(v, dict)), start=1):
            action = clean_text(v.get("play_method", v.get("action")), 120)
            if not action:
                continue
            variant = source.variants.add(
                id=f"{source.id}v{v_index}", action=action, timbre=_timbre(v.get("timbre")),
                instrument_role=role_from_name(v.get("mapping_to_music_instrument", v.get("role")))
                if ("mapping_to_music_instrument" in v or "role" in v) else common_pb2.INSTRUMENT_ROLE_UNSPECIFIED,
            )
            confidence = _confidence(v.get("confidence"))
            if confidence is not None:
                variant.confidence = confidence
        if not source.name or not source.variants:
            del description.sources[-1]
    return description


def description_to_seed(description: common_pb2.SceneDescription) -> dict:
    """SceneDescription → the seed's dict, exactly its keys (instrument "None" when unmapped)."""
    return {
        "scene_description": description.scene,
        "mood_description": description.mood,
        "sound_sources": [
            {
                "name": source.name,
                "material": source.material,
                "variants": [
                    _variant_to_seed(v)
                    for v in source.variants
                ],
            }
            for source in description.sources
        ],
    }


def _variant_to_seed(variant: common_pb2.SoundVariant) -> dict:
    out = {
        "play_method": variant.action,
        "timbre": list(variant.timbre),
        "mapping_to_music_instrument": NAME_BY_ROLE.get(variant.instrument_role, "None"),
    }
    if variant.HasField("confidence"):  # older files had none: don't invent one
        out["confidence"] = round(variant.confidence, 3)
    return out


def read_seed_file(path) -> common_pb2.SceneDescription:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.loads(f.read(), strict=False)
    except json.JSONDecodeError as exc:
        raise SeedFormatError(f"{path}: not valid JSON ({exc})") from None
    return description_from_seed(data)


def dump_seed(description: common_pb2.SceneDescription) -> str:
    return json.dumps(description_to_seed(description), indent=2, ensure_ascii=False) + "\n"
