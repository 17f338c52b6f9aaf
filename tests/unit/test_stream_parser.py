"""The incremental JSON stream parser and detokenizer (vlm_service.json_stream, vlm_service.detokenizer), on realistic model outputs
cut into random pieces."""

from __future__ import annotations

import json
import random

import pytest

from vlm_service.detokenizer import IncrementalDetokenizer
from vlm_service.json_stream import JsonStreamParser, ParsedHeader, ParsedSource

COMPACT = json.dumps(
    {
        "scene": "A café terrace by the sea — wind, gulls & clinking cups 🌊",
        "mood": "lazy, warm",
        "sources": [
            {"name": "waves", "material": "rocky shore", "variants": [
                {"action": "crashing on rocks", "timbre": ["deep", "foamy"], "role": "bass", "confidence": 0.9},
                {"action": "lapping at the pier", "timbre": ["soft"], "role": "none", "confidence": 0.62},
            ]},
            {"name": "cups", "material": "ceramic", "variants": [
                {"action": "clinking {on} saucers", "timbre": ["bright", "sharp"], "role": "keyboard", "confidence": 0.8},
            ]},
            {"name": "gulls", "material": "feathers", "variants": [
                {"action": "crying overhead", "timbre": ["shrill"], "role": "guitar", "confidence": 0.75},
            ]},
        ],
    },
    separators=(",", ":"),
    ensure_ascii=False,
)

SEED_STYLE = """Sure! Here is the description:
```json
{
  "scene_description": "A kitchen with a \\"whistling\\" kettle,\\nsteam and a ticking clock.",
  "mood_description": "cozy",
  "sound_sources": [
    {
      "name": "kettle",
      "material": "steel",
      "variants": [
        {"play_method": "whistling on the stove", "timbre": "high, piercing",
         "mapping_to_music_instrument": "keyboard", "confidence": 0.9},
        {"play_method": "rattling lid \\\\ bubbling", "timbre": ["metallic"],
         "mapping_to_music_instrument": "None"}
      ],
      "location": {"x_min": 0.1, "y_min": 0.2, "x_max": 0.3, "y_max": 0.4}
    },
    {
      "name": "clock \\u00e9l\\u00e9gant",
      "material": "brass",
      "variants": [{"play_method": "ticking", "timbre": ["dry"], "mapping_to_music_instrument": null}]
    }
  ]
}
```
Let me know if you need anything else. {"not": "this"}"""

OBJECTS_STYLE = '{"objects":[{"name":"door","material":"oak","variants":[{"play_method":"slamming"}]}],' \
    '"scene_description":"A hallway.","mood_description":"tense"}'

CONTROL_CHARS = '{"scene":"tab\there\x01 and\x7f","mood":"odd\x03","sources":[{"name":"bell\x02","material":"",' \
    '"variants":[{"action":"ringing\t","timbre":[],"role":"drums","confidence":1}]}]}'

SAMPLES = [COMPACT, SEED_STYLE, OBJECTS_STYLE, CONTROL_CHARS]


def _reference(text: str) -> tuple[dict, list[dict]]:
    """What the parser should find, from json.loads of the first complete object."""
    start = text.index("{")
    obj, _ = json.JSONDecoder(strict=False).raw_decode(text[start:])
    scene = obj.get("scene", obj.get("scene_description", ""))
    mood = obj.get("mood", obj.get("mood_description", ""))
    sources = obj.get("sources", obj.get("sound_sources", obj.get("objects", [])))
    return {"scene": scene, "mood": mood}, sources


def _run(pieces) -> list:
    parser = JsonStreamParser()
    events = []
    for piece in pieces:
        events.extend(parser.feed(piece))
    events.extend(parser.close())
    return events


def _random_str_pieces(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 60))))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def _random_byte_pieces(text: str, rng: random.Random) -> list[bytes]:
    data = text.encode("utf-8")
    cuts = sorted(rng.sample(range(1, len(data)), k=min(len(data) - 1, rng.randint(1, 80))))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("text", SAMPLES, ids=["compact", "seed-fenced", "objects-key", "control-chars"])
def test_whole_text_matches_json_loads(text):
    header, sources = _reference(text)
    events = _run([text])
    assert isinstance(events[0], ParsedHeader)
    if text is not OBJECTS_STYLE:  # there the sources come first and force an early, empty header
        assert events[0] == ParsedHeader(scene=header["scene"], mood=header["mood"])
    parsed = [e for e in events if isinstance(e, ParsedSource)]
    assert [e.data for e in parsed] == sources
    assert [e.index for e in parsed] == list(range(1, len(sources) + 1))
    assert sum(isinstance(e, ParsedHeader) for e in events) == 1


@pytest.mark.parametrize("text", SAMPLES, ids=["compact", "seed-fenced", "objects-key", "control-chars"])
def test_random_chunkings_give_the_same_events(text):
    expected = _run([text])
    rng = random.Random(f"chunks:{text[:20]}")
    for _ in range(150):
        assert _run(_random_str_pieces(text, rng)) == expected
        assert _run(_random_byte_pieces(text, rng)) == expected


def test_one_character_at_a_time_and_one_byte_at_a_time():
    expected = _run([COMPACT])
    assert _run(list(COMPACT)) == expected
    data = COMPACT.encode("utf-8")
    assert _run([data[i : i + 1] for i in range(len(data))]) == expected


def test_header_is_emitted_exactly_when_the_mood_string_closes():
    parser = JsonStreamParser()
    mood_close = COMPACT.index('"lazy, warm"') + len('"lazy, warm"') - 1
    for i, ch in enumerate(COMPACT):
        events = parser.feed(ch)
        if i < mood_close:
            assert events == [], i
        elif i == mood_close:
            assert events == [ParsedHeader("A café terrace by the sea — wind, gulls & clinking cups 🌊", "lazy, warm")]
            break


def test_each_source_is_emitted_at_its_closing_brace():
    parser = JsonStreamParser()
    positions = []
    for i, ch in enumerate(COMPACT):
        for event in parser.feed(ch):
            if isinstance(event, ParsedSource):
                positions.append(i)
    _, sources = _reference(COMPACT)
    expected = []
    search_from = COMPACT.index('"sources"')
    for source in sources:
        chunk = json.dumps(source, separators=(",", ":"), ensure_ascii=False)
        start = COMPACT.index(chunk, search_from)
        expected.append(start + len(chunk) - 1)
        search_from = start + len(chunk)
    assert positions == expected
    assert parser.complete


def test_header_is_forced_before_a_source_when_mood_comes_late():
    events = _run([OBJECTS_STYLE])
    assert isinstance(events[0], ParsedHeader)
    assert events[0] == ParsedHeader("", "")  # scene and mood come after the sources in this output
    assert isinstance(events[1], ParsedSource)
    assert len(events) == 2
    parser = JsonStreamParser()
    parser.feed(OBJECTS_STYLE)
    assert (parser.scene, parser.mood) == ("A hallway.", "tense")  # still recorded for the final description


def test_truncated_output_keeps_complete_parts_and_close_is_idempotent():
    cut = COMPACT.index('{"name":"gulls"') + 10
    parser = JsonStreamParser()
    events = parser.feed(COMPACT[:cut])
    events += parser.close()
    assert parser.close() == []
    assert not parser.complete
    assert [e.data["name"] for e in events if isinstance(e, ParsedSource)] == ["waves", "cups"]
    assert isinstance(events[0], ParsedHeader)


def test_header_emitted_at_close_when_nothing_was_decoded():
    parser = JsonStreamParser()
    assert parser.feed('{"scene":"half') == []
    assert parser.close() == [ParsedHeader("", "")]


def test_text_after_the_object_and_before_it_is_ignored():
    text = "```json\n" + COMPACT + "\n```\n" + '{"scene":"x","mood":"y","sources":[{"name":"z"}]}'
    assert _run([text]) == _run([COMPACT])


def test_nested_objects_inside_a_source_do_not_emit_sources():
    events = _run([SEED_STYLE])
    kettle = [e for e in events if isinstance(e, ParsedSource)][0]
    assert kettle.data["location"] == {"x_min": 0.1, "y_min": 0.2, "x_max": 0.3, "y_max": 0.4}
    assert kettle.data["variants"][1]["play_method"] == "rattling lid \\ bubbling"


def test_feed_after_close_raises():
    parser = JsonStreamParser()
    parser.close()
    with pytest.raises(RuntimeError):
        parser.feed("{")


def test_incremental_detokenizer_never_splits_characters():
    # A byte-level vocabulary where multi-byte characters span several tokens.
    text = "clinking cups 🌊 — café ☕ ok"
    data = text.encode("utf-8")
    rng = random.Random(3)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(data)), k=12))
        vocab = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
        detok = IncrementalDetokenizer(lambda ids, v=vocab: b"".join(v[i] for i in ids).decode("utf-8", "replace"))
        pieces = [detok.push(i) for i in range(len(vocab))]
        pieces.append(detok.flush())
        assert "".join(pieces) == text
        assert all("\ufffd" not in p for p in pieces)
