"""Prompt templates (vlm_prompt) and what xgrammar 0.2.8 enforces of the v1 schema."""

from __future__ import annotations

import json

import jsonschema
import re

import pytest

from vlm_prompt import available_versions, load_prompt
from vlm_service import rules


def _walk(schema, path="$"):
    yield path, schema
    for key, sub in schema.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{key}")
    if "items" in schema:
        yield from _walk(schema["items"], f"{path}[]")


def test_v1_loads_with_all_parts():
    prompt = load_prompt("v1")
    assert prompt.version == "v1"
    assert "v1" in available_versions()
    assert prompt.system and prompt.task and prompt.schema and prompt.examples
    assert "{example}" not in prompt.user_text
    assert json.dumps(prompt.examples[0]["output"], separators=(",", ":")) in prompt.user_text
    messages = prompt.messages()
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[1]["content"][0] == {"type": "image"}
    assert messages[1]["content"][1]["text"] == prompt.user_text
    assert load_prompt() == prompt


def test_prompt_states_the_seed_rules():
    text = (load_prompt().system + " " + load_prompt().user_text).lower()
    for word in ("speech", "footsteps", "clapping", "drums", "bass", "keyboard", "guitar", "none", "confidence",
                 "material", "timbre", "no music"):
        assert word in text, word


@pytest.mark.parametrize("version", ["v0", "../v1", "V1", "v1/..", "", "v999"])
def test_bad_versions_are_refused(version):
    with pytest.raises(ValueError):
        load_prompt(version)


def test_schema_is_valid_and_bounds_every_string_and_array():
    schema = load_prompt().schema
    jsonschema.Draft202012Validator.check_schema(schema)
    for path, node in _walk(schema):
        if node.get("type") == "string" and "enum" not in node:
            # Bounded by maxLength, or by a pattern whose last quantifier is bounded ({0,N}$).
            pattern = node.get("pattern", "")
            assert "maxLength" in node or re.search(r"\{0,\d+\}\)?\??\$$", pattern), path
        if node.get("type") == "array":
            assert "maxItems" in node, path
        if node.get("type") == "object":
            assert node.get("additionalProperties") is False, path
            assert set(node["required"]) <= set(node["properties"]), path
    assert schema["properties"]["scene"]["minLength"] == 1
    assert schema["properties"]["mood"]["minLength"] == 1


@pytest.mark.parametrize("text, ok", [("rain", True), ("tin roof", True), ("], ", False), ("", False),
                                      ("9 dogs", False), ("door-bell's ring", True), ("x" * 41, False)])
def test_names_must_be_words(text, ok):
    """A random-weight model under the grammar names sources with words, so every source is captionable."""
    pattern = load_prompt().schema["properties"]["sources"]["items"]["properties"]["name"]["pattern"]
    assert bool(re.match(pattern, text)) is ok


def test_examples_validate_against_the_schema_and_survive_the_rules():
    prompt = load_prompt()
    for example in prompt.examples:
        jsonschema.validate(example["output"], prompt.schema)
        desc = rules.description_from_dict(example["output"], apply_rules=False)
        assert rules.to_compact_dict(desc) == example["output"]


# -- xgrammar on the schema, with the tiny checkpoint's tokenizer ---------------------------------------


@pytest.fixture(scope="module")
def grammar(tiny_vlm_dir):
    from transformers import AutoTokenizer

    from vlm_service.grammar import build_tokenizer_info, compile_schema

    tokenizer = AutoTokenizer.from_pretrained(tiny_vlm_dir)
    info = build_tokenizer_info(tokenizer, 151936, [151645, 151643])
    return compile_schema(info, load_prompt().schema)


def _complete(grammar, text: str) -> bool:
    import xgrammar as xgr

    matcher = xgr.GrammarMatcher(grammar)
    return matcher.accept_string(text) and matcher.is_completed()


def _doc(**changes):
    """A valid compact answer (three sources, the minimum), with `changes` applied to the first source."""
    doc = {"scene": "A street.", "mood": "calm", "sources": [{"name": name, "material": "roof", "variants": [
        {"action": "drumming", "timbre": ["metallic"], "role": "drums", "confidence": 0.9}]} for name in ("rain", "wind", "car")]}
    variant = doc["sources"][0]["variants"][0]
    for key, value in changes.items():
        target = doc if key in doc else doc["sources"][0] if key in doc["sources"][0] else variant
        target[key] = value
    return json.dumps(doc, separators=(",", ":"))


def test_xgrammar_accepts_the_example_in_compact_form(grammar):
    assert _complete(grammar, json.dumps(load_prompt().examples[0]["output"], separators=(",", ":")))
    assert _complete(grammar, _doc())
    assert _complete(grammar, _doc(confidence=1))
    assert _complete(grammar, _doc(timbre=[]))


@pytest.mark.parametrize(
    "changes",
    [
        {"scene": ""},  # minLength
        {"mood": "m" * 49},  # maxLength
        {"name": "n" * 41},
        {"action": ""},
        {"timbre": ["a", "b", "c", "d"]},  # maxItems
        {"timbre": ["x" * 21]},
        {"role": "violin"},  # enum
        {"confidence": 1.5},  # maximum
        {"confidence": -0.1},  # minimum
        {"confidence": 0.1234567},  # at most 6 fraction digits
        {"variants": []},  # minItems
        {"sources": []},
        {"sources": [{"name": "rain", "material": "", "variants": [{"action": "falling", "timbre": [], "role": "none", "confidence": 1}]}] * 2},
        {"name": "], rain"},  # names, materials, actions, timbre words start with a letter
        {"material": " roof"},
        {"action": "-drumming"},
        {"timbre": ["9 bright"]},
    ],
)
def test_xgrammar_enforces_the_bounds(grammar, changes):
    assert not _complete(grammar, _doc(**changes))


def test_xgrammar_bounds_the_number_of_sources_and_variants(grammar):
    doc = json.loads(_doc())
    doc["sources"] = doc["sources"] * 9
    assert not _complete(grammar, json.dumps(doc, separators=(",", ":")))
    doc = json.loads(_doc())
    doc["sources"][0]["variants"] = doc["sources"][0]["variants"] * 5
    assert not _complete(grammar, json.dumps(doc, separators=(",", ":")))


def test_added_tokens_are_never_allowed_inside_strings(grammar):
    import xgrammar as xgr

    matcher = xgr.GrammarMatcher(grammar)
    assert matcher.accept_string('{"scene":"A')
    bitmask = xgr.allocate_token_bitmask(1, 151936)
    matcher.fill_next_token_bitmask(bitmask)
    allowed = {i for i in range(151643, 151665) if (int(bitmask[0, i // 32]) >> (i % 32)) & 1}
    assert allowed == set()  # <|image_pad|>, <|vision_start|>, <|im_start|>, <tool_call>... all masked


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_any_path_through_the_grammar_is_schema_valid(tiny_vlm_dir, version):
    """Always schema-valid, checked at the grammar itself: random walks over the tokens the compiled
    grammar allows (what a random-weight model does) end in JSON that validates against the schema."""
    import json
    import random

    import torch
    import xgrammar as xgr
    from transformers import AutoTokenizer

    from vlm_service.grammar import build_tokenizer_info

    tokenizer = AutoTokenizer.from_pretrained(tiny_vlm_dir)
    info = build_tokenizer_info(tokenizer, 151936, [151645, 151643])
    schema = load_prompt(version).schema
    grammar = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))
    bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
    for trial in range(12):
        matcher, rng, tokens = xgr.GrammarMatcher(grammar), random.Random(trial), []
        while not matcher.is_terminated():
            matcher.fill_next_token_bitmask(bitmask)
            logits = torch.zeros(1, info.vocab_size)
            xgr.apply_token_bitmask_inplace(logits, bitmask)
            token = rng.choice(torch.nonzero(logits[0] > -1e30).flatten().tolist())
            assert matcher.accept_token(token)
            tokens.append(token)
            assert len(tokens) < 5000, "the grammar must bound the output"
        jsonschema.validate(json.loads(tokenizer.decode(tokens, skip_special_tokens=True), strict=False), schema)


# -- v2: sources first -----------------------------------------------------------------------------------


def test_v2_is_v1_with_sources_first_and_the_text_before_the_image():
    v1, v2 = load_prompt("v1"), load_prompt("v2")
    assert "v2" in available_versions()
    assert list(v2.schema["properties"]) == ["sources", "scene", "mood"]
    assert v2.schema["properties"] == v1.schema["properties"]  # same keys and bounds, another order
    assert v1.image_first and not v2.image_first
    assert [part["type"] for part in v2.messages()[1]["content"]] == ["text", "image"]
    for example in v2.examples:
        jsonschema.validate(example["output"], v2.schema)
        assert list(example["output"]) == ["sources", "scene", "mood"]
    assert v2.examples[0]["output"] == v1.examples[0]["output"]  # the same answer
    # The seed file written from either is the same (the format on disk does not change).
    from i2s_formats.seed_format import dumps_seed

    assert dumps_seed(rules.description_from_dict(v2.examples[0]["output"], apply_rules=False)) == \
        dumps_seed(rules.description_from_dict(v1.examples[0]["output"], apply_rules=False))


def test_v2_puts_the_first_complete_source_earlier(tiny_vlm_dir):
    """Tokens until the first source object closes, on each version's example answer (tiny tokenizer)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_vlm_dir)
    counts = {}
    for version in ("v1", "v2"):
        output = load_prompt(version).examples[0]["output"]
        text = json.dumps(output, separators=(",", ":"))
        first = json.dumps(output["sources"][0], separators=(",", ":"))
        counts[version] = len(tokenizer(text[: text.index(first) + len(first)], add_special_tokens=False)["input_ids"])
    print(f"tokens to the first complete source: {counts}")
    assert counts["v2"] < counts["v1"]


@pytest.mark.parametrize("layout", ['{"image_first": "no"}', '{"image": false}', '[]'])
def test_a_malformed_layout_is_refused(tmp_path, monkeypatch, layout):
    import shutil

    from vlm_prompt import loader

    shutil.copytree(loader._ROOT / "v2", tmp_path / "v2")
    (tmp_path / "v2" / "layout.json").write_text(layout)
    monkeypatch.setattr(loader, "_ROOT", tmp_path)
    with pytest.raises(ValueError):
        load_prompt("v2")


def test_v2_sources_are_captioned_without_the_scene():
    """With v2 a source's clips start before the scene is decoded: its caption is complete without it."""
    from orchestrator.prompts import build_caption, SoundVariant

    source = load_prompt("v2").examples[0]["output"]["sources"][0]
    variant = SoundVariant(name=source["name"], material=source["material"],
                           action=source["variants"][0]["action"], timbre=tuple(source["variants"][0]["timbre"]))
    without = build_caption(variant, scene="")
    with_scene = build_caption(variant, scene="A rainy street at night.")
    assert without.lower().startswith("rain drumming on the tin roof")
    assert with_scene.startswith(without) and "street" in with_scene and "street" not in without
