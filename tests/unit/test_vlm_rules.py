"""Reading descriptions, cleaning, the seed's post-rules and the seed file format (vlm_service.rules)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from image_to_sound.v1 import common_pb2
from i2s_formats import seed_format
from i2s_formats.source_merge import merge_sources
from vlm_service import rules

Role = common_pb2.InstrumentRole


def _variant(action, confidence=None, vid="v", role=Role.INSTRUMENT_ROLE_NONE):
    v = common_pb2.SoundVariant(id=vid, action=action, instrument_role=role)
    if confidence is not None:
        v.confidence = confidence
    return v


def _source(sid, name, variants, material=""):
    return common_pb2.SoundSource(id=sid, name=name, material=material, variants=variants)


def _all_variants(desc):
    return [(s.name, v.action) for s in desc.sources for v in s.variants]


# -- cleaning -----------------------------------------------------------------------------------------


def test_clean_text_removes_control_characters_and_collapses_whitespace():
    assert seed_format.clean_text("  rain\x01 on\t\tthe \n roof\x7f\u200b ", 100) == "rain on the roof"
    assert seed_format.clean_text(None, 10) == ""
    assert seed_format.clean_text(0.5, 10) == "0.5"
    assert seed_format.clean_text(["a", None, "b"], 10) == "a, b"
    assert seed_format.clean_text("\U0006bc88unassigned", 20) == "unassigned"


def test_clean_text_bounds_length_at_a_word_boundary():
    text = "water dripping slowly from a rusty gutter into a bucket"
    out = seed_format.clean_text(text, 30)
    assert len(out) <= 30
    assert out == "water dripping slowly from a"
    assert seed_format.clean_text("x" * 50, 10) == "x" * 10


@pytest.mark.parametrize(
    "value, role",
    [
        ("guitar", Role.INSTRUMENT_ROLE_GUITAR),
        ("Bass", Role.INSTRUMENT_ROLE_BASS),
        (" keyboard ", Role.INSTRUMENT_ROLE_KEYBOARD),
        ("drums", Role.INSTRUMENT_ROLE_DRUMS),
        ("drum", Role.INSTRUMENT_ROLE_DRUMS),
        ("None", Role.INSTRUMENT_ROLE_NONE),
        ("none", Role.INSTRUMENT_ROLE_NONE),
        (None, Role.INSTRUMENT_ROLE_UNSPECIFIED),
        ("", Role.INSTRUMENT_ROLE_UNSPECIFIED),
        ("violin", Role.INSTRUMENT_ROLE_UNSPECIFIED),
        (3, Role.INSTRUMENT_ROLE_UNSPECIFIED),
    ],
)
def test_parse_role(value, role):
    assert seed_format.parse_role(value) == role


@pytest.mark.parametrize(
    "value, expected",
    [(0.8, 0.8), (1, 1.0), ("0.75", 0.75), ("85%", 0.85), (85, 0.85), (-0.2, 0.0), (150, 1.0),
     (None, None), ("high", None), (float("nan"), None), (float("inf"), None), (True, None)],
)
def test_parse_confidence(value, expected):
    got = seed_format.parse_confidence(value)
    assert got == pytest.approx(expected) if expected is not None else got is None


def test_parse_timbre_from_list_or_string():
    assert seed_format.parse_timbre("metallic, sharp;  bright") == ["metallic", "sharp", "bright"]
    assert seed_format.parse_timbre(["Deep", "deep", "", "low/rumbling"]) == ["Deep", "low", "rumbling"]
    assert seed_format.parse_timbre(None) == []
    assert len(seed_format.parse_timbre(",".join(f"w{i}" for i in range(20)))) == seed_format.MAX_TIMBRE_WORDS


# -- reading descriptions -----------------------------------------------------------------------------

SEED_OUTPUT = """{
  "scene_description": "A rainy street\\n at night.",
  "mood_description": "calm",
  "sound_sources": [
    {"name": "rain", "material": "tin roof", "variants": [
      {"play_method": "drumming on the roof", "timbre": "metallic, steady",
       "mapping_to_music_instrument": "drums", "confidence": 0.9},
      {"play_method": "dripping from gutters", "timbre": ["soft"], "mapping_to_music_instrument": "None"}
    ]},
    {"name": "car", "material": "asphalt", "variants": [
      {"play_method": "passing by", "timbre": ["low"], "mapping_to_music_instrument": null, "confidence": 0.8},
      {"play_method": "horn honking", "timbre": ["loud"], "confidence": 0.75}
    ]},
    {"name": "people", "material": "", "variants": [
      {"play_method": "talking under umbrellas", "timbre": ["murmur"], "mapping_to_music_instrument": "None", "confidence": 0.95},
      {"play_method": "footsteps splashing", "timbre": ["wet"], "mapping_to_music_instrument": "drums", "confidence": 0.85}
    ]}
  ]
}
"""


def _parse(text: str, apply_rules: bool = True) -> common_pb2.SceneDescription:
    return rules.description_from_dict(json.loads(text, strict=False), apply_rules=apply_rules)


def test_read_seed_output_with_aliases():
    desc = _parse(SEED_OUTPUT)
    assert desc.scene == "A rainy street at night."
    assert desc.mood == "calm"
    assert [s.id for s in desc.sources] == ["s1", "s2", "s3"]
    rain, car, people = desc.sources
    assert [v.id for v in rain.variants] == ["s1v1", "s1v2"]
    assert list(rain.variants[0].timbre) == ["metallic", "steady"]
    assert rain.variants[0].instrument_role == Role.INSTRUMENT_ROLE_DRUMS
    assert rain.variants[1].instrument_role == Role.INSTRUMENT_ROLE_NONE
    assert not rain.variants[1].HasField("confidence")  # missing stays unset (and counts as kept)
    assert car.variants[0].instrument_role == Role.INSTRUMENT_ROLE_UNSPECIFIED  # null
    assert car.variants[1].instrument_role == Role.INSTRUMENT_ROLE_UNSPECIFIED  # absent
    assert [v.action for v in people.variants] == ["footsteps splashing"]  # talking filtered
    assert people.variants[0].id == "s3v2"


def test_parse_objects_key_and_compact_keys():
    older = '{"scene_description":"Hall","mood_description":"quiet","objects":[{"name":"door","material":"oak",' \
            '"variants":[{"play_method":"creaking"}]}]}'
    desc = _parse(older)
    assert _all_variants(desc) == [("door", "creaking")]
    compact = '{"scene":"Hall","mood":"quiet","sources":[{"name":"door","material":"oak","variants":' \
              '[{"action":"creaking","timbre":["dry"],"role":"guitar","confidence":0.9}]}]}'
    desc = _parse(compact)
    assert desc.sources[0].variants[0].instrument_role == Role.INSTRUMENT_ROLE_GUITAR
    assert desc.sources[0].variants[0].confidence == pytest.approx(0.9)


def test_parse_raw_control_characters_inside_strings():
    text = '{"scene":"a\x01b\tc","mood":"m\x02","sources":[{"name":"bell\x03","material":"bronze\n",' \
           '"variants":[{"action":"ringing\x00 loudly","timbre":"clear\x1f"}]}]}'
    desc = _parse(text)
    assert desc.scene == "ab c"
    assert desc.mood == "m"
    assert desc.sources[0].name == "bell"
    assert desc.sources[0].material == "bronze"
    assert desc.sources[0].variants[0].action == "ringing loudly"
    assert list(desc.sources[0].variants[0].timbre) == ["clear"]


def test_sources_and_variants_without_name_or_action_are_dropped():
    desc = _parse(json.dumps({"scene": "s", "mood": "m", "sources": [
        {"name": "", "variants": [{"action": "x"}]},
        {"name": "wind", "variants": [{"action": " \x01 "}, {"action": "howling through gaps"}]},
        "not an object"]}))
    assert [(s.id, s.name, [v.id for v in s.variants]) for s in desc.sources] == [("s2", "wind", ["s2v2"])]


# -- post-rules ---------------------------------------------------------------------------------------


def test_low_confidence_dropped_but_at_least_five_kept():
    desc = common_pb2.SceneDescription(scene="s", mood="m", sources=[
        _source("s1", "rain", [_variant("drumming", 0.9, "s1v1"), _variant("dripping", 0.6, "s1v2")]),
        _source("s2", "car", [_variant("passing", 0.8, "s2v1"), _variant("honking", 0.5, "s2v2")]),
        _source("s3", "dog", [_variant("barking", 0.3, "s3v1"), _variant("panting", 0.65, "s3v2")]),
        _source("s4", "clock", [_variant("ticking", None, "s4v1")]),  # missing confidence: kept
    ])
    out = rules.apply_post_rules(desc)
    assert [(s.id, [v.id for v in s.variants]) for s in out.sources] == [
        ("s1", ["s1v1", "s1v2"]), ("s2", ["s2v1"]), ("s4", ["s4v1"]), ("s3", ["s3v2"])]
    assert sum(len(s.variants) for s in out.sources) == 5


def test_no_readmission_when_five_are_confident():
    variants = [_variant(f"action {i}", 0.8, f"s1v{i}") for i in range(1, 6)] + [_variant("weak", 0.69, "s1v6")]
    out = rules.apply_post_rules(common_pb2.SceneDescription(sources=[_source("s1", "thing", variants)]))
    assert [v.id for v in out.sources[0].variants] == [f"s1v{i}" for i in range(1, 6)]


def test_fewer_than_five_in_all_keeps_everything_eligible():
    desc = common_pb2.SceneDescription(sources=[
        _source("s1", "a", [_variant("x", 0.1, "s1v1")]), _source("s2", "b", [_variant("y", 0.2, "s2v1")])])
    out = rules.apply_post_rules(desc)
    assert _all_variants(out) == [("a", "x"), ("b", "y")]


def test_dedupe_by_name_and_action_case_insensitively_keeping_the_more_confident():
    desc = common_pb2.SceneDescription(sources=[
        _source("s1", "Rain", [_variant("Drumming  on roof", 0.9, "s1v1"), _variant("hiss", 0.5, "s1v2")]),
        _source("s2", "rain ", [_variant("drumming on ROOF", 0.95, "s2v1"), _variant("HISS", 0.6, "s2v2")]),
        _source("s3", "hail", [_variant("drumming on roof", 0.9, "s3v1")]),  # other source: not a duplicate
    ])
    out = rules.apply_post_rules(desc, min_variants=10)
    assert [(s.id, [v.id for v in s.variants]) for s in out.sources] == [
        ("s1", ["s1v1"]), ("s3", ["s3v1"]), ("s2", ["s2v2"])]


@pytest.mark.parametrize(
    "name, action, vocal",
    [
        ("people", "talking", True),
        ("man", "speaking on the phone", True),
        ("crowd", "conversation", True),
        ("children", "laughing", True),
        ("baby", "crying", True),
        ("woman", "singing", True),
        ("vendor", "shouting prices", True),
        ("couple", "whispering", True),
        ("crowd", "cheering", True),
        ("radio", "voices", True),
        ("street", "people chatting", True),
        ("person", "footsteps on gravel", False),
        ("crowd", "clapping", False),
        ("man", "rustling clothes", False),
        ("runner", "breathing heavily", False),
        ("person", "coughing", False),
        ("birds", "singing", False),
        ("kettle", "whistling", False),
        ("gulls", "crying overhead", False),
        ("wind", "howling", False),
        ("fridge", "humming", False),
        ("ceiling fans", "humming", False),
        ("tyres", "screaming", False),
    ],
)
def test_speech_filter(name, action, vocal):
    assert rules.is_vocal(name, action) is vocal


def test_speech_variants_and_emptied_sources_are_dropped():
    desc = common_pb2.SceneDescription(sources=[
        _source("s1", "people", [_variant("talking", 0.9, "s1v1"), _variant("laughing", 0.9, "s1v2")]),
        _source("s2", "people", [_variant("talking", 0.9, "s2v1"), _variant("footsteps", 0.9, "s2v2")]),
    ])
    out = rules.apply_post_rules(desc)
    assert [(s.id, [v.id for v in s.variants]) for s in out.sources] == [("s2", ["s2v2"])]


def _random_sources(rng: random.Random) -> list[common_pb2.SoundSource]:
    names = ["rain", "car", "dog", "people", "door", "wind", "Rain"]
    actions = ["drumming", "passing", "barking", "talking", "slamming", "howling", "dripping", "laughing"]
    sources = []
    for i in range(1, rng.randint(1, 7) + 1):
        variants = []
        for j in range(1, rng.randint(1, 4) + 1):
            conf = None if rng.random() < 0.2 else round(rng.random(), 2)
            variants.append(_variant(rng.choice(actions), conf, f"s{i}v{j}"))
        sources.append(_source(f"s{i}", rng.choice(names), variants))
    return sources


def test_streamed_events_merge_to_the_final_description():
    rng = random.Random(11)
    for _ in range(300):
        sources = _random_sources(rng)
        post = rules.PostRules()
        events = [e for e in (post.add(s) for s in sources) if e is not None]
        events += post.finish()
        final = post.description("scene", "mood")
        assert list(final.sources) == merge_sources(events)
        # One-shot form agrees.
        assert rules.apply_post_rules(common_pb2.SceneDescription(scene="scene", mood="mood", sources=sources)) == final
        # Variant ids are never repeated across events; no event is empty.
        ids = [v.id for e in events for v in e.variants]
        assert len(ids) == len(set(ids))
        assert all(e.variants for e in events)
        # At least five, when that many eligible variants exist.
        eligible = {(s.name.lower().strip(), v.action.lower()) for s in sources for v in s.variants
                    if not rules.is_vocal(s.name, v.action)}
        assert sum(len(s.variants) for s in final.sources) >= min(5, len(eligible))
        assert all(s.variants for s in final.sources)


def test_add_after_finish_raises():
    post = rules.PostRules()
    post.finish()
    with pytest.raises(RuntimeError):
        post.add(_source("s1", "a", [_variant("x", 0.9, "s1v1")]))


# -- seed file format ---------------------------------------------------------------------------------


def _example_description() -> common_pb2.SceneDescription:
    return _parse(SEED_OUTPUT, apply_rules=False)


def test_to_seed_dict_has_exactly_the_seed_shape():
    d = seed_format.to_seed_dict(_example_description())
    assert set(d) == {"scene_description", "mood_description", "sound_sources"}
    for source in d["sound_sources"]:
        assert set(source) == {"name", "material", "variants"}
        for variant in source["variants"]:
            assert set(variant) - {"confidence"} == {"play_method", "timbre", "mapping_to_music_instrument"}
            assert variant["mapping_to_music_instrument"] in {"guitar", "bass", "keyboard", "drums", "None"}
            assert isinstance(variant["timbre"], list)
    rain = d["sound_sources"][0]["variants"]
    assert rain[0]["confidence"] == 0.9  # rounded from float32
    assert "confidence" not in rain[1]  # unset stays unset
    assert rain[1]["mapping_to_music_instrument"] == "None"
    assert d["sound_sources"][1]["variants"][0]["mapping_to_music_instrument"] == "None"  # unspecified
    json.dumps(d)


def test_seed_dict_round_trip():
    desc = _example_description()
    back = seed_format.from_seed_dict(json.loads(json.dumps(seed_format.to_seed_dict(desc))))
    assert seed_format.to_seed_dict(back) == seed_format.to_seed_dict(desc)
    assert [s.id for s in back.sources] == ["s1", "s2", "s3"]


def test_from_seed_dict_accepts_older_files_and_applies_no_rules():
    older = {
        "scene_description": "A park.",
        "mood_description": "calm",
        "objects": [
            {"name": "fountain", "material": "stone", "variants": [
                {"play_method": "splashing", "timbre": "soft, wet"},
                {"play_method": "gurgling", "timbre": ["low"], "mapping_to_music_instrument": None,
                 "confidence": 0.2},
                {"play_method": "trickling", "timbre": [], "mapping_to_music_instrument": "None"},
            ]},
            {"name": "children", "material": "", "variants": [{"play_method": "laughing", "timbre": []}]},
        ],
    }
    desc = seed_format.from_seed_dict(older)
    assert _all_variants(desc) == [("fountain", "splashing"), ("fountain", "gurgling"),
                                   ("fountain", "trickling"), ("children", "laughing")]
    roles = [v.instrument_role for v in desc.sources[0].variants]
    assert roles == [Role.INSTRUMENT_ROLE_UNSPECIFIED, Role.INSTRUMENT_ROLE_UNSPECIFIED, Role.INSTRUMENT_ROLE_NONE]
    assert not desc.sources[0].variants[0].HasField("confidence")
    assert desc.prompt_version == "" and desc.model_id == ""
    with pytest.raises(ValueError):
        seed_format.from_seed_dict(["not", "an", "object"])


def test_rules_module_does_not_import_torch_or_transformers():
    code = (
        "import sys, vlm_service.rules, vlm_service.backend, vlm_service.json_stream, vlm_service.detokenizer, vlm_service.grammar, vlm_prompt; "
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.split() == ["False", "False"]


def test_names_and_actions_without_letters_or_digits_are_dropped():
    from vlm_service.rules import description_from_dict

    description = description_from_dict({"scene": "s", "mood": "m", "sources": [
        {"name": "],", "material": "", "variants": [{"action": "ringing", "confidence": 0.9}]},
        {"name": "bell", "material": "brass", "variants": [{"action": "--", "confidence": 0.9},
                                                           {"action": "ringing", "confidence": 0.9}]}]},
        apply_rules=False)
    assert [s.name for s in description.sources] == ["bell"]
    assert [v.action for v in description.sources[0].variants] == ["ringing"]
