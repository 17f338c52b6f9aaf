"""Property-based tests (hypothesis) of what turns untrusted text into prompts and file names: the
description parser, the caption builder and clip file naming; and the seed-file reader on hostile files."""
from __future__ import annotations

import json
import math
import re

from hypothesis import HealthCheck, given, settings, strategies as st

from audio_service.backend import AudioRequest
from image_to_sound.v1 import common_pb2
from orchestrator import prompts
from orchestrator.naming import clip_file_name, safe_name
from i2s_formats import seed_format
from i2s_formats.seed_format import SeedFormatError, description_from_raw, dumps_seed, read_seed_file

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
ROLES = set(common_pb2.InstrumentRole.values())
WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}

# Text as hostile as it gets: every Unicode category, control characters, path pieces, long runs.
hostile_text = st.one_of(
    st.text(max_size=300),
    st.sampled_from(["../", "..\\..\\", "/etc/passwd", "CON", "nul", "COM1.txt", "\x00", "\n\r", "\u202e", " ", ""]),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=500, max_size=3000),
)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), hostile_text)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.one_of(hostile_text, st.sampled_from(
        ["name", "variants", "play_method", "action", "timbre", "confidence", "mapping_to_music_instrument",
         "sound_sources", "objects", "scene_description", "material", "role"])), inner, max_size=6)), max_leaves=40)
raw_variant = st.fixed_dictionaries({}, optional={
    "play_method": json_scalars, "timbre": st.one_of(json_scalars, st.lists(json_scalars, max_size=8)),
    "mapping_to_music_instrument": json_scalars, "confidence": json_scalars})
raw_source = st.fixed_dictionaries({}, optional={"name": json_scalars, "material": json_scalars,
                                                 "variants": st.one_of(json_scalars, st.lists(raw_variant, max_size=4))})
raw_description = st.fixed_dictionaries({}, optional={
    "scene_description": json_scalars, "mood_description": json_scalars,
    "sound_sources": st.one_of(json_values, st.lists(raw_source, max_size=5))})


def clean(text: str, limit: int) -> bool:
    return text.isprintable() and text == text.strip() and len(text) <= limit


@PROPERTY
@given(st.one_of(raw_description, json_values))
def test_the_parser_turns_anything_into_a_clean_bounded_description(data):
    try:
        description = description_from_raw(data)
    except ValueError:
        assert not isinstance(data, dict)  # only a non-object is refused
        return
    assert clean(description.scene, seed_format.MAX_SCENE_CHARS) and clean(description.mood, seed_format.MAX_MOOD_CHARS)
    for source in description.sources:
        assert clean(source.name, seed_format.MAX_NAME_CHARS) and seed_format.has_words(source.name)
        assert clean(source.material, seed_format.MAX_MATERIAL_CHARS)
        for variant in source.variants:
            assert clean(variant.action, seed_format.MAX_ACTION_CHARS) and seed_format.has_words(variant.action)
            assert len(variant.timbre) <= seed_format.MAX_TIMBRE_WORDS
            assert all(clean(t, seed_format.MAX_TIMBRE_CHARS) and t for t in variant.timbre)
            assert variant.instrument_role in ROLES
            if variant.HasField("confidence"):
                assert math.isfinite(variant.confidence) and 0.0 <= variant.confidence <= 1.0
    # What the parser produced survives the seed file format unchanged (ids aside; the seed writes both
    # "no role" and "unspecified" as "None").
    def shape(d):
        return [(s.name, s.material, [(v.action, list(v.timbre), seed_format.role_name(v.instrument_role))
                                      for v in s.variants]) for s in d.sources]

    assert shape(description_from_raw(json.loads(dumps_seed(description)))) == shape(description)


@PROPERTY
@given(hostile_text, hostile_text, hostile_text, hostile_text, hostile_text, st.lists(hostile_text, max_size=6))
def test_every_caption_is_printable_and_accepted_by_the_audio_service(scene, mood, name, material, action, timbre):
    source = common_pb2.SoundSource(name=name.replace("\x00", ""), material=material.replace("\x00", ""))
    variant = common_pb2.SoundVariant(action=action.replace("\x00", ""), timbre=[t.replace("\x00", "") for t in timbre])
    try:
        caption = prompts.caption_for_variant(scene, mood, source, variant)
    except ValueError:
        return  # nothing in the variant to caption: the pipeline fails that clip alone
    assert caption.isprintable() and caption.strip() == caption
    AudioRequest(prompt=caption)  # never refused downstream for its prompt (it checks itself)


@PROPERTY
@given(st.integers(min_value=1, max_value=99), hostile_text, hostile_text)
def test_clip_file_names_are_safe_on_every_filesystem(index, source_name, action):
    name = clip_file_name(index, source_name, action)
    assert re.fullmatch(r"\d\d_[a-z0-9_]+_[a-z0-9_]+\.wav", name), name
    assert len(name) <= 2 + 1 + 40 + 1 + 40 + 4
    assert name.split(".")[0].lower() not in WINDOWS_RESERVED
    part = safe_name(source_name)
    assert part and ".." not in part and "/" not in part and "\\" not in part
    assert safe_name(part) == part  # idempotent: a cleaned name stays as it is


@PROPERTY
@given(st.one_of(st.binary(max_size=2000), st.text(max_size=500).map(str.encode),
                 st.integers(min_value=1, max_value=100_000).map(lambda n: b"[" * n),
                 raw_description.map(lambda d: json.dumps(d).encode())))
def test_hostile_description_files_are_refused_with_seed_format_error(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("hostile") / "x_sound_source.json"
    path.write_bytes(content)
    try:
        description = read_seed_file(path)
    except SeedFormatError as exc:
        assert str(path) in str(exc)
        return
    assert any(source.variants for source in description.sources)


def test_an_oversized_description_file_is_not_read(tmp_path):
    path = tmp_path / "big_sound_source.json"
    path.write_bytes(b'{"sound_sources": [' + b'{"name": "bell", "variants": ["rings"]},' * 40_000 + b"{}]}")
    try:
        read_seed_file(path)
    except SeedFormatError as exc:
        assert "larger than" in str(exc)
    else:
        raise AssertionError("a 1.6 MB description file was read")
