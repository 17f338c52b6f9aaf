"""Descriptions as plain data: the seed's JSON file format, read tolerantly (docs/architecture.md
"Compatibility with the seed").

    {"scene_description": str, "mood_description": str,
     "sound_sources": [{"name": str, "material": str,
        "box": [x_min, y_min, x_max, y_max],   (optional, added: 0..1 of the image; only when located)
        "variants": [{"play_method": str, "timbre": [str, ...],
                      "mapping_to_music_instrument": "guitar"|"bass"|"keyboard"|"drums"|"None",
                      "confidence": float}]}]}

Shared by the VLM service (it parses what the model wrote with the same code) and the command line
(--skip_vlm reads these files). Reading accepts older files (`objects` instead of `sound_sources`, no
confidence, an instrument that is "None", null or absent, timbre as one string) and the compact v1
keys (scene, mood, sources, action, role). Every string is cleaned on the way in: no control
characters reach prompts, protobuf or file names. No torch here.
"""
from __future__ import annotations

import json
import math
import os
import re
import unicodedata
from typing import Any, Iterable, Mapping

from image_to_sound.v1 import common_pb2
from i2s_formats import boxes

# Length bounds applied when cleaning strings (characters). Looser than the v1 schema's, since they also
# apply to seed files and unconstrained backends.
MAX_SCENE_CHARS = 400
MAX_MOOD_CHARS = 120
MAX_NAME_CHARS = 60
MAX_MATERIAL_CHARS = 60
MAX_ACTION_CHARS = 120
MAX_TIMBRE_CHARS = 32
MAX_TIMBRE_WORDS = 5
MAX_FILE_BYTES = 1024 * 1024  # a description file is a few KB; a bigger one is not read into memory

_SCENE_KEYS = ("scene", "scene_description")
_MOOD_KEYS = ("mood", "mood_description")
_SOURCES_KEYS = ("sources", "sound_sources", "objects")
_NAME_KEYS = ("name", "source", "object")
_MATERIAL_KEYS = ("material",)
_VARIANTS_KEYS = ("variants",)
_ACTION_KEYS = ("action", "play_method")
_TIMBRE_KEYS = ("timbre",)
_ROLE_KEYS = ("role", "mapping_to_music_instrument", "instrument")
_CONFIDENCE_KEYS = ("confidence",)

Role = common_pb2.InstrumentRole

_ROLE_BY_WORD = {
    "guitar": Role.INSTRUMENT_ROLE_GUITAR,
    "bass": Role.INSTRUMENT_ROLE_BASS,
    "keyboard": Role.INSTRUMENT_ROLE_KEYBOARD,
    "keyboards": Role.INSTRUMENT_ROLE_KEYBOARD,
    "keys": Role.INSTRUMENT_ROLE_KEYBOARD,
    "piano": Role.INSTRUMENT_ROLE_KEYBOARD,
    "drums": Role.INSTRUMENT_ROLE_DRUMS,
    "drum": Role.INSTRUMENT_ROLE_DRUMS,
    "percussion": Role.INSTRUMENT_ROLE_DRUMS,
    "none": Role.INSTRUMENT_ROLE_NONE,
    "no": Role.INSTRUMENT_ROLE_NONE,
    "n/a": Role.INSTRUMENT_ROLE_NONE,
}
SEED_ROLE_NAME = {
    Role.INSTRUMENT_ROLE_GUITAR: "guitar",
    Role.INSTRUMENT_ROLE_BASS: "bass",
    Role.INSTRUMENT_ROLE_KEYBOARD: "keyboard",
    Role.INSTRUMENT_ROLE_DRUMS: "drums",
}


def role_name(role: int) -> str:
    """The seed's word for an instrument role: "guitar"/"bass"/"keyboard"/"drums", else "None"."""
    return SEED_ROLE_NAME.get(role, "None")


def clean_text(value: Any, max_chars: int) -> str:
    """Make a model- or file-provided value safe for prompts, protobuf and file names.

    Converts to str (lists are joined with ", "), replaces control and format characters (C* Unicode
    categories) with spaces or drops them, collapses whitespace, trims, and cuts to ``max_chars`` at a
    word boundary when one is near.
    """
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        value = ", ".join(clean_text(v, max_chars) for v in value if v is not None)
    elif not isinstance(value, str):
        value = str(value)
    out = []
    for ch in value:
        cat = unicodedata.category(ch)
        if ch.isspace():
            out.append(" ")
        elif cat[0] == "C":  # Cc control, Cf format, Cs surrogate, Co private use, Cn unassigned
            continue
        else:
            out.append(ch)
    text = " ".join("".join(out).split())
    if len(text) > max_chars:
        cut = text[:max_chars]
        space = cut.rfind(" ")
        if space >= max_chars // 2:
            cut = cut[:space]
        text = cut.rstrip(" ,;:-")
    return text


def has_words(text: str) -> bool:
    """A name or action must contain a letter or digit: "]," names no sound (random-weight models emit such)."""
    return any(ch.isalnum() for ch in text)


def parse_role(value: Any) -> int:
    """Instrument role from a model's or file's value: "guitar"/"bass"/"keyboard"/"drums" (any case, a few
    synonyms), "None"/"none" -> NONE; null, missing, empty or unknown -> UNSPECIFIED."""
    if not isinstance(value, str):
        return Role.INSTRUMENT_ROLE_UNSPECIFIED
    word = value.strip().lower()
    return _ROLE_BY_WORD.get(word, Role.INSTRUMENT_ROLE_UNSPECIFIED)


def parse_confidence(value: Any) -> float | None:
    """A confidence in [0, 1], or None when missing or unreadable. Numeric strings and "85%" are read;
    values in (1, 100] are taken as percent; the rest is clamped to [0, 1]."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str):
        text = value.strip().rstrip("%").strip()
        try:
            number = float(text)
        except ValueError:
            return None
        if value.strip().endswith("%"):
            number /= 100.0
    elif isinstance(value, (int, float)):
        number = float(value)
    else:
        return None
    if not math.isfinite(number):
        return None
    if 1.0 < number <= 100.0:
        number /= 100.0
    return min(1.0, max(0.0, number))


def parse_timbre(value: Any) -> list[str]:
    """Timbre words from a list or a comma/semicolon/slash separated string; cleaned, deduped, at most 5."""
    if value is None:
        return []
    items: list[Any]
    if isinstance(value, str):
        items = re.split(r"[,;/|]", value)
    elif isinstance(value, (list, tuple)):
        items = []
        for item in value:
            items.extend(re.split(r"[,;/|]", item) if isinstance(item, str) else [item])
    else:
        items = [value]
    out: list[str] = []
    seen: set[str] = set()
    for item in items:
        word = clean_text(item, MAX_TIMBRE_CHARS)
        if word and word.lower() not in seen:
            seen.add(word.lower())
            out.append(word)
        if len(out) == MAX_TIMBRE_WORDS:
            break
    return out


def _get(d: Mapping[str, Any], keys: Iterable[str]) -> Any:
    """The value of the first of ``keys`` present in ``d`` (exact match first, then case-insensitive)."""
    for key in keys:
        if key in d:
            return d[key]
    lowered = {str(k).strip().lower(): v for k, v in d.items()}
    for key in keys:
        if key in lowered:
            return lowered[key]
    return None


def variant_from_raw(raw: Any, variant_id: str) -> common_pb2.SoundVariant | None:
    """One variant from a compact (action/timbre/role/confidence) or seed (play_method/timbre/
    mapping_to_music_instrument/confidence) dict; None when it has no usable action."""
    if isinstance(raw, str):
        raw = {"action": raw}
    if not isinstance(raw, Mapping):
        return None
    action = clean_text(_get(raw, _ACTION_KEYS), MAX_ACTION_CHARS)
    if not has_words(action):
        return None
    variant = common_pb2.SoundVariant(
        id=variant_id,
        action=action,
        timbre=parse_timbre(_get(raw, _TIMBRE_KEYS)),
        instrument_role=parse_role(_get(raw, _ROLE_KEYS)),
    )
    confidence = parse_confidence(_get(raw, _CONFIDENCE_KEYS))
    if confidence is not None:
        variant.confidence = confidence
    return variant


def source_from_raw(raw: Any, index: int) -> common_pb2.SoundSource | None:
    """One source (all its usable variants, cleaned, with ids) from a raw dict; None without a name."""
    if not isinstance(raw, Mapping):
        return None
    name = clean_text(_get(raw, _NAME_KEYS), MAX_NAME_CHARS)
    if not has_words(name):
        return None
    source = common_pb2.SoundSource(
        id=f"s{index}", name=name, material=clean_text(_get(raw, _MATERIAL_KEYS), MAX_MATERIAL_CHARS),
        location=boxes.location_from_file(raw.get(boxes.BOX_KEY)),
    )
    raw_variants = _get(raw, _VARIANTS_KEYS)
    if isinstance(raw_variants, (Mapping, str)):
        raw_variants = [raw_variants]
    if not isinstance(raw_variants, list):  # true, 3, null: no variants rather than a crash
        raw_variants = []
    for j, raw_variant in enumerate(raw_variants, start=1):
        variant = variant_from_raw(raw_variant, f"s{index}v{j}")
        if variant is not None:
            source.variants.append(variant)
    return source


def description_from_raw(data: Mapping[str, Any]) -> common_pb2.SceneDescription:
    """A SceneDescription from a parsed JSON object in the seed or the compact v1 format, every usable
    source and variant kept as written (cleaned, with ids s<i> / s<i>v<j>); no post-rule applied."""
    if not isinstance(data, Mapping):
        raise ValueError("description must be a JSON object")
    scene = clean_text(_get(data, _SCENE_KEYS), MAX_SCENE_CHARS)
    mood = clean_text(_get(data, _MOOD_KEYS), MAX_MOOD_CHARS)
    raw_sources = _get(data, _SOURCES_KEYS)
    if isinstance(raw_sources, Mapping):
        raw_sources = [raw_sources]
    if not isinstance(raw_sources, list):
        raw_sources = []
    sources = [s for i, raw in enumerate(raw_sources, start=1) if (s := source_from_raw(raw, i)) is not None]
    return common_pb2.SceneDescription(scene=scene, mood=mood, sources=sources)


def round_confidence(value: float) -> float:
    return round(float(value), 3)


def to_seed_dict(desc: common_pb2.SceneDescription) -> dict[str, Any]:
    """The seed's JSON file shape (docs/architecture.md "Compatibility with the seed"). Instrument:
    "guitar"/"bass"/"keyboard"/"drums", else "None". ``confidence`` is written rounded to 3 decimals, and left
    out when unset (as in the seed's older files). Ids, prompt version and model id are not part of the seed
    format."""
    return {
        "scene_description": desc.scene,
        "mood_description": desc.mood,
        "sound_sources": [
            {
                "name": source.name,
                "material": source.material,
                # An added optional field: files without boxes are what the seed wrote.
                **({boxes.BOX_KEY: boxes.to_list(source.location)} if source.HasField("location") else {}),
                "variants": [
                    {
                        "play_method": variant.action,
                        "timbre": list(variant.timbre),
                        "mapping_to_music_instrument": role_name(variant.instrument_role),
                        **(
                            {"confidence": round_confidence(variant.confidence)}
                            if variant.HasField("confidence")
                            else {}
                        ),
                    }
                    for variant in source.variants
                ],
            }
            for source in desc.sources
        ],
    }


def from_seed_dict(data: Mapping[str, Any]) -> common_pb2.SceneDescription:
    """A SceneDescription from a seed file's JSON (also older shapes: ``objects`` instead of
    ``sound_sources``, missing confidence, instrument "None"/null/absent; and the compact v1 keys).

    Strings are cleaned and ids assigned; no post-rule is applied (the VLM service applies those:
    vlm_service.rules).
    Raises ValueError when ``data`` is not an object.
    """
    return description_from_raw(data)


def dumps_seed(desc: common_pb2.SceneDescription) -> str:
    """The seed file's text (indented, UTF-8 characters kept)."""
    return json.dumps(to_seed_dict(desc), indent=2, ensure_ascii=False)


class SeedFormatError(ValueError):
    """A file is not a description in the seed's format (or one of its older variants)."""


def read_seed_file(path: str | os.PathLike) -> common_pb2.SceneDescription:
    """Reads a seed description file; raises SeedFormatError saying what is wrong with it."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
        if len(raw) > MAX_FILE_BYTES:
            raise SeedFormatError(f"{path}: larger than {MAX_FILE_BYTES} bytes; not a description")
        data = json.loads(raw.decode("utf-8"), strict=False)  # older files may hold raw control characters
    except UnicodeDecodeError:
        raise SeedFormatError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise SeedFormatError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:  # "[[[[...": nesting deeper than any description
        raise SeedFormatError(f"{path}: JSON nested too deeply") from None
    if not isinstance(data, Mapping) or not isinstance(_get(data, _SOURCES_KEYS), list):
        raise SeedFormatError(f"{path}: no 'sound_sources' (or 'objects') list")
    description = from_seed_dict(data)
    if not any(source.variants for source in description.sources):
        raise SeedFormatError(f"{path}: no sound source with a usable variant")
    return description
