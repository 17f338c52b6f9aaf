"""The seed's description files as the command line reads and writes them (--skip_vlm, resume)."""
import json

import pytest

from image_to_sound.v1 import common_pb2
from i2s_formats.seed_format import SeedFormatError, dumps_seed, from_seed_dict, read_seed_file, to_seed_dict

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


def test_round_trip_keeps_exactly_the_seed_format(tmp_path):
    description = from_seed_dict(SEED)
    assert [s.id for s in description.sources] == ["s1", "s2"]
    assert [v.id for v in description.sources[0].variants] == ["s1v1", "s1v2"]
    assert description.sources[0].variants[0].instrument_role == common_pb2.INSTRUMENT_ROLE_DRUMS
    assert description.sources[0].variants[1].instrument_role == common_pb2.INSTRUMENT_ROLE_NONE
    assert to_seed_dict(description) == SEED
    path = tmp_path / "rain_sound_source.json"
    path.write_text(dumps_seed(description))
    assert read_seed_file(path) == description


@pytest.mark.parametrize("instrument", [None, "None", "ABSENT"])
def test_older_files_objects_key_missing_confidence_and_any_none_instrument(tmp_path, instrument):
    variant = {"play_method": "purring", "timbre": "soft, low"}
    if instrument != "ABSENT":
        variant["mapping_to_music_instrument"] = instrument
    path = tmp_path / "cat_sound_source.json"
    path.write_text(json.dumps({"scene_description": "a cat", "mood_description": "cosy",
                                "objects": [{"name": "cat", "material": "fur", "variants": [variant]}]}))
    description = read_seed_file(path)
    v = description.sources[0].variants[0]
    assert v.action == "purring" and list(v.timbre) == ["soft", "low"]
    assert not v.HasField("confidence")
    written = to_seed_dict(description)["sound_sources"][0]["variants"][0]
    # Unmapped in any spelling is written back as the seed's "None"; a missing confidence is not invented.
    assert written["mapping_to_music_instrument"] == "None" and "confidence" not in written


def test_control_characters_are_cleaned_and_files_read_non_strict(tmp_path):
    path = tmp_path / "x_sound_source.json"
    # A raw tab and a raw newline inside strings: json.loads rejects them unless strict=False.
    path.write_text('{"scene_description": "a\tb", "mood_description": "c\nd", "sound_sources": '
                    '[{"name": "dog\\u0007", "material": "", "variants": [{"play_method": "barking"}]}]}')
    description = read_seed_file(path)
    assert (description.scene, description.mood, description.sources[0].name) == ("a b", "c d", "dog")


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ('{"scene_description": "x"}', "sound_sources"),
    ('["a list"]', "sound_sources"),
    ('{"sound_sources": [{"name": "ghost", "variants": [{"play_method": ""}]}]}', "no sound source"),
])
def test_broken_files_say_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(SeedFormatError, match=message):
        read_seed_file(path)
