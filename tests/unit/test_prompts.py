"""Caption construction: short, AudioCaps-style, inside CLAP's 77 tokens, no music, clean, deterministic."""
from __future__ import annotations

import re
import unicodedata
from types import SimpleNamespace

import pytest

from audio_service.config import DEFAULT_NEGATIVE_PROMPT
from orchestrator.prompts import MAX_CAPTION_WORDS, SoundVariant, build_caption, caption_for_variant
from tests.seed_style import seed_style_prompt

# The project's rule (docs/architecture.md "Models and testing without their weights"): a caption fits CLAP's tokens.
CLAP_TOKENS = 77

# (variant, scene, mood, words the caption must contain: source, material, action)
REALISTIC = [
    (
        SoundVariant("rain", "tin roof", "drumming on the roof", ("sharp", "metallic", "steady"), "drums"),
        "A rainy night in a small town, with wet streets and dim street lights reflecting on the puddles",
        "calm and slightly melancholic",
        ("rain", "tin", "roof", "drumming"),
    ),
    (
        SoundVariant("dog", "fur", "barking at a stranger", ("loud", "sharp", "echoing"), "bass"),
        "The image shows a suburban backyard with a wooden fence and a small doghouse.",
        "tense, alert",
        ("dog", "barking"),  # "fur" says nothing about the sound and is left out
    ),
    (
        SoundVariant("footsteps", "gravel", "crunching slowly", ("crisp", "rhythmic"), "drums"),
        "A quiet garden path in the late afternoon",
        "peaceful",
        ("footsteps", "gravel", "crunching"),
    ),
    (
        SoundVariant("kettle", "stainless steel", "whistling as the water boils", ("high-pitched", "shrill"), "keyboard"),
        "A cozy kitchen in the morning with sunlight streaming through the window",
        "warm and homely",
        ("kettle", "steel", "whistling"),
    ),
    (
        SoundVariant("door", "wood", "creaking open slowly on its hinges", ("creaky", "low", "drawn-out"), "guitar"),
        "An old abandoned house with dusty furniture",
        "eerie",
        ("door", "wooden", "creaking"),
    ),
    (
        SoundVariant("waves", "rocks", "crashing and receding", ("deep", "rumbling", "rhythmic"), "bass"),
        "A rocky coastline at sunset with seagulls overhead",
        "serene",
        ("waves", "rocks", "crashing"),
    ),
    (
        SoundVariant("glass bottles", "glass", "clinking against each other", ("bright", "bell-like"), "keyboard"),
        "A crowded bar at night, people chatting at the counter",
        "lively",
        ("glass", "bottles", "clinking"),
    ),
    (
        SoundVariant("campfire", "dry wood", "crackling and popping", ("warm", "sharp", "irregular"), "drums"),
        "Outdoors at a forest campsite under the stars",
        "cozy",
        ("campfire", "wood", "crackling"),
    ),
]
IDS = [v[0].name for v in REALISTIC]

MUSIC_WORDS = {
    "music", "musical", "melody", "melodic", "song", "singing", "instrument", "instruments", "guitar", "bass",
    "keyboard", "drum", "drums", "piano", "violin", "chord", "harmony", "synthesizer", "orchestra",
}


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9-]+", text.lower())


def n_tokens(text: str, tokenizer) -> int:
    """Tokens of the CLAP (Roberta) tokenizer, special tokens included."""
    return len(tokenizer(text, add_special_tokens=True, truncation=False, verbose=False)["input_ids"])


@pytest.mark.parametrize("variant,scene,mood,expected", REALISTIC, ids=IDS)
def test_caption_fits_clap_budget_and_names_source_material_action(variant, scene, mood, expected, tiny_clap_tokenizer):
    caption = build_caption(variant, scene, mood)
    assert n_tokens(caption, tiny_clap_tokenizer) <= CLAP_TOKENS
    for word in expected:
        assert word in words(caption), (word, caption)
    assert 3 <= len(caption.split()) <= 20, caption
    assert caption[0].isupper()


@pytest.mark.parametrize("variant,scene,mood,expected", REALISTIC, ids=IDS)
def test_seed_style_prompt_does_not_fit_but_caption_does(variant, scene, mood, expected, tiny_clap_tokenizer):
    seed_prompt = seed_style_prompt(variant, scene, mood)
    assert 150 <= len(seed_prompt.split()) <= 200
    assert n_tokens(seed_prompt, tiny_clap_tokenizer) > CLAP_TOKENS
    caption = build_caption(variant, scene, mood)
    assert n_tokens(caption, tiny_clap_tokenizer) * 3 < n_tokens(seed_prompt, tiny_clap_tokenizer)


@pytest.mark.parametrize("variant,scene,mood,expected", REALISTIC, ids=IDS)
def test_captions_carry_no_music_or_instrument_words(variant, scene, mood, expected):
    caption = build_caption(variant, scene, mood)
    assert variant.instrument_role  # every realistic variant has a role; it is metadata only
    assert not MUSIC_WORDS & set(words(caption)), caption


def test_music_words_inside_fields_are_dropped():
    variant = SoundVariant(
        name="guitar string", material="steel", action="plucked like a melody", timbre=("melodic", "bright", "bass"),
        instrument_role="guitar",
    )
    caption = build_caption(variant, "a music room", "")
    assert not MUSIC_WORDS & set(words(caption)), caption
    assert "string" in words(caption) and "plucked" in words(caption)
    # A source that is only an instrument word becomes an object.
    guitar = build_caption(SoundVariant("acoustic guitar", "wood", "strummed", ("warm",), "guitar"))
    assert "guitar" not in words(guitar) and "strummed" in words(guitar)
    assert build_caption(SoundVariant("guitar", "wood", "tapped with fingers")) == "Wooden object tapped with fingers"
    # A computer keyboard is not an instrument, but the word is: it becomes "keys".
    typing = build_caption(SoundVariant("laptop keyboard", "plastic", "typing quickly"), "an office")
    assert "keyboard" not in words(typing) and "keys" in words(typing)


def test_control_characters_quotes_and_odd_whitespace_are_stripped():
    dirty = SoundVariant(
        name='"Kettle\x00"\n',
        material="stainless\tsteel\u200b",
        action="whistling\x07  as\r\nwater\x1b boils",
        timbre=["'shrill'", "high-pitched\x0b", "\u201csteady\u201d"],
        instrument_role="keyboard",
    )
    clean = SoundVariant("kettle", "stainless steel", "whistling as water boils", ("shrill", "high-pitched", "steady"))
    caption = build_caption(dirty, "A cozy\x0c kitchen\u2028 in the morning", "warm")
    assert caption == build_caption(clean, "A cozy kitchen in the morning", "warm")
    assert not any(unicodedata.category(ch)[0] == "C" for ch in caption)
    assert not any(q in caption for q in "\"'`\u201c\u201d\u2018\u2019")
    assert "  " not in caption and caption == caption.strip()


def test_deterministic():
    for variant, scene, mood, _ in REALISTIC:
        assert build_caption(variant, scene, mood) == build_caption(variant, scene, mood)
    assert build_caption(REALISTIC[0][0], REALISTIC[0][1]) == (
        "Rain drumming on the tin roof, sharp, metallic, steady, in a rainy night in a small town"
    )


def test_word_budget_drops_scene_first_then_timbre():
    scene = "A busy fishing harbour at dawn"
    timbre = ("sharp", "metallic", "steady")
    full = build_caption(SoundVariant("rain", "tin roof", "drumming on the roof", timbre), scene)
    assert words(full)[-3:] == ["harbour", "at", "dawn"] and "steady" in words(full)  # short enough: all kept
    no_scene = build_caption(SoundVariant("rain drops", "tin roof", "drumming very hard and fast on the roof", timbre), scene)
    assert "harbour" not in words(no_scene) and "steady" in words(no_scene)  # the scene went first
    wordier = SoundVariant("heavy cold rain drops", "tin roof", "drumming hard and fast on the old roof",
                           ("sharp and bright", "metallic ringing", "steady and loud"))
    less_timbre = build_caption(wordier, scene)
    assert "harbour" not in words(less_timbre) and "metallic" in words(less_timbre)
    assert "loud" not in words(less_timbre)  # then the last timbre phrase
    for caption in (full, no_scene, less_timbre):
        assert len(caption.replace(",", " ").split()) <= MAX_CAPTION_WORDS


def test_negative_prompt_steers_away_from_music_and_speech():
    negative = set(re.findall(r"[a-z]+", DEFAULT_NEGATIVE_PROMPT))
    assert {"music", "melody", "singing", "speech", "talking", "low", "quality", "distorted", "noise"} <= negative


def test_source_without_a_name_is_rejected():
    with pytest.raises(ValueError):
        build_caption(SoundVariant(name=" \x00 '' "))


def test_caption_for_variant_reads_contract_field_names():
    source = SimpleNamespace(name="door", material="wood")
    variant = SimpleNamespace(action="creaking open slowly", timbre=["creaky"], instrument_role=2)
    assert caption_for_variant("An old house", "eerie", source, variant) == build_caption(
        SoundVariant("door", "wood", "creaking open slowly", ("creaky",)), "An old house"
    )
