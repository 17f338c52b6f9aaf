"""The seed's description files: read every older variant, write exactly the seed's keys."""
import json

import pytest

from image_to_sound.v1 import common_pb2
from serving.seed_format import (SeedFormatError, clean_text, description_from_seed, description_to_seed, dump_seed,
                                 read_seed_file)

SEED = {
    "scene_description": "A rainy street at night with parked cars.",
    "mood_description": "calm, melancholic",
    "sound_sources": [
        {"name": "rain", "material": "tin roof", "variants": [
            {"play_method": "drumming on the roof", "timbre": ["metallic", "sharp"],
             "mapping_to_music_instrument": "drums", "confidence": 0.92},
            {"play_method": "dripping from the gutter", "timbre": ["soft"], "mapping_to_music_instrument": "None",
             "confidence": 0.75}]},
        {"name": "car", "material": "metal", "variants": [
            {"play_method": "engine idling", "timbre": ["low", "rumbling"], "mapping_to_music_instrument": "bass",
             "confidence": 0.8}]},
    ],
}


def test_round_trip_keeps_exactly_the_seed_format():
    description = description_from_seed(SEED)
    assert [s.id for s in description.sources] == ["s1", "s2"]
    assert [v.id for v in description.sources[0].variants] == ["s1v1", "s1v2"]
    assert description.sources[0].variants[0].instrument_role == common_pb2.INSTRUMENT_ROLE_DRUMS
    assert description.sources[0].variants[1].instrument_role == common_pb2.INSTRUMENT_ROLE_NONE
    assert description_to_seed(description) == SEED


@pytest.mark.parametrize("instrument", [None, "None", "none", "ABSENT"])
def test_older_files_objects_key_missing_confidence_and_any_none_instrument(instrument):
    variant = {"play_method": "purring", "timbre": "soft, low"}
    if instrument != "ABSENT":
        variant["mapping_to_music_instrument"] = instrument
    old = {"scene_description": "a cat", "mood_description": "cosy",
           "objects": [{"name": "cat", "material": "fur", "variants": [variant]}]}
    description = description_from_seed(old)
    v = description.sources[0].variants[0]
    assert v.action == "purring" and list(v.timbre) == ["soft", "low"]
    assert not v.HasField("confidence")
    expected = common_pb2.INSTRUMENT_ROLE_UNSPECIFIED if instrument == "ABSENT" else common_pb2.INSTRUMENT_ROLE_NONE
    assert v.instrument_role == expected
    written = description_to_seed(description)["sound_sources"][0]["variants"][0]
    assert written["mapping_to_music_instrument"] == "None" and "confidence" not in written


def test_control_characters_are_cleaned_and_files_read_non_strict(tmp_path):
    path = tmp_path / "x_sound_source.json"
    # A raw tab and a raw newline inside strings: json.loads rejects them unless strict=False.
    path.write_text('{"scene_description": "a\tb", "mood_description": "c\nd", "sound_sources": '
                    '[{"name": "dog\\u0007", "material": "", "variants": [{"play_method": "barking"}]}]}')
    description = read_seed_file(path)
    assert (description.scene, description.mood, description.sources[0].name) == ("a b", "c d", "dog")
    assert clean_text("  many   spaces\x00here ") == "many spaces here"


def test_broken_files_say_what_is_wrong(tmp_path):
    with pytest.raises(SeedFormatError, match="sound_sources"):
        description_from_seed({"scene_description": "x"})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SeedFormatError, match="not valid JSON"):
        read_seed_file(bad)


def test_sources_without_usable_variants_are_dropped():
    description = description_from_seed({"sound_sources": [
        {"name": "ghost", "variants": [{"play_method": ""}]}, {"name": "wind", "variants": [{"play_method": "howling"}]}]})
    assert [s.name for s in description.sources] == ["wind"]
    assert json.loads(dump_seed(description))["sound_sources"][0]["name"] == "wind"
