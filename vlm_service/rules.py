"""The seed's post-rules over descriptions, and the compact answer format.

No torch or transformers here (the command line's ``--skip_vlm`` path imports this module).

- :class:`PostRules` applies the seed's rules incrementally, so a stream can emit each source as it
  closes and the re-admitted variants at the end; :func:`apply_post_rules` is the one-shot form.
- :func:`description_from_dict` reads a parsed answer (compact keys or the seed's) and applies the rules;
  :func:`to_compact_dict` writes the compact shape the model answers in. The seed's file format itself
  lives in :mod:`i2s_formats.seed_format` (``to_seed_dict`` / ``from_seed_dict``). Model output is parsed
  as it streams by :class:`vlm_service.json_stream.JsonStreamParser`.

Rules (from the seed, docs/architecture.md "Compatibility with the seed"), as implemented here:

1. Speech filter. A variant is dropped when its source name or action names human speech or an
   emotional/vocal sound: always for words that only people do (talking, speech, conversation,
   whispering, laughing, sobbing, shouting, yelling, voices, singer...); and for vocal words that animals
   or things also do (singing, crying, screaming, humming, cheering, chanting, murmuring, calling,
   whistling, howling...) only when the source is a person (person, man, woman, child, crowd, baby, ...
   in the name or the action). So "birds singing" and "kettle whistling" stay, "woman singing" goes.
   Physical human sounds stay: footsteps, clapping, rustling clothes, typing, and also breathing,
   coughing, sneezing and snoring (bodily, non-verbal, not emotional).
2. Dedupe: a variant whose (source name, action) equals an earlier one, case- and
   whitespace-insensitively, is dropped. An admitted variant is never withdrawn (it may already have
   been streamed), so the first confident one wins; a held-back one gives way to a more confident twin.
3. Confidence: variants with confidence < 0.7 are held back (missing confidence counts as 1.0, kept).
4. At least five: at the end, if fewer than 5 variants were admitted, the most confident held-back
   variants are re-admitted (ties: the earlier one) until there are 5 or none is left.
5. Sources left with no admitted variant are dropped.

Ids: source ``s<i>`` is the i-th source object of the model's output (1-based) and variant
``s<i>v<j>`` its j-th variant, so ids are stable and never reused; dropped items leave gaps.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from image_to_sound.v1 import common_pb2
from i2s_formats import boxes, seed_format
from i2s_formats.source_merge import SourceMerge
from i2s_formats.seed_format import SEED_ROLE_NAME, Role, description_from_raw, round_confidence

MIN_CONFIDENCE = 0.7
MIN_VARIANTS = 5

_COMPACT_ROLE_NAME = {**SEED_ROLE_NAME, Role.INSTRUMENT_ROLE_NONE: "none"}

# Speech filter vocabularies (see the module docstring).
_ALWAYS_VOCAL = frozenset("""
speech speak speaks speaking spoken talk talks talking talked chat chats chatting conversation conversations
conversing dialogue dialogues dialog narration narrating narrator announcement announcements announcing
announcer whisper whispers whispering whispered gossip gossiping voice voices vocal vocals vocalizing
vocalising lyrics laughter laugh laughs laughing laughed giggle giggles giggling chuckle chuckles chuckling
sob sobs sobbing weep weeps weeping singer singers choir rapping shout shouts shouting shouted yell yells
yelling yelled argue arguing argument greeting greetings
""".split())
_HUMAN_ONLY_VOCAL = frozenset("""
sing sings singing sang song songs cry cries crying scream screams screaming shriek shrieks shrieking
cheer cheers cheering chant chants chanting hum hums humming murmur murmurs murmuring mumble mumbles
mumbling babble babbles babbling babbling chatter chatters chattering call calls calling moan moans moaning
groan groans groaning sigh sighs sighing wail wails wailing howl howls howling whistle whistles whistling
coo coos cooing pray prays praying prayer prayers grunt grunts grunting squeal squeals squealing
""".split())
_HUMAN = frozenset("""
person persons people man men woman women child children kid kids baby babies infant infants toddler
toddlers boy boys girl girls crowd crowds audience spectators spectator family friends couple
teenager teenagers teen teens student students worker workers tourist tourists passerby passersby
pedestrian pedestrians customer customers vendor vendors shopper shoppers human humans someone somebody
guy guys lady ladies gentleman gentlemen performer performers mother father mom dad
grandmother grandfather parent parents waiter waitress chef officer soldier soldiers farmer fisherman
fishermen skater skaters cyclist cyclists rider riders hiker hikers swimmer swimmers diner diners
neighbor neighbors neighbour neighbours commuter commuters traveler travelers traveller travellers
""".split())
_WORD_RE = re.compile(r"[a-z]+")


# --------------------------------------------------------------------------------------------------
# Post-rules (incremental)
# --------------------------------------------------------------------------------------------------


def _words(text: str) -> set[str]:
    return set(_WORD_RE.findall(text.lower()))


def is_vocal(source_name: str, action: str) -> bool:
    """True when the (source, action) pair is human speech or an emotional/vocal human sound."""
    name_words = _words(source_name)
    action_words = _words(action)
    if (name_words | action_words) & _ALWAYS_VOCAL:
        return True
    human = bool((name_words | action_words) & _HUMAN)
    return human and bool((action_words | name_words) & _HUMAN_ONLY_VOCAL)


def _dedupe_key(source_name: str, action: str) -> tuple[str, str]:
    return (" ".join(source_name.lower().split()), " ".join(action.lower().split()))


def _confidence(variant: common_pb2.SoundVariant) -> float:
    return variant.confidence if variant.HasField("confidence") else 1.0


@dataclass
class _Held:
    confidence: float
    order: int
    source: common_pb2.SoundSource  # the source it came from (name, material, id); its variants unused
    variant: common_pb2.SoundVariant
    key: tuple[str, str]
    dropped: bool = False


class PostRules:
    """The seed's post-rules, applied source by source.

    ``add(source)`` takes a cleaned source with ids (as from :func:`source_from_raw`) and returns the
    source with its variants admitted now (confident enough, not speech, not duplicates), or None when
    none is. ``finish()`` returns the re-admitted variants, grouped as one source per source id (only the
    new variants). The final description (:meth:`description`) is the merge of everything returned, in
    order, by source id: exactly what a stream of those sources merges to.
    """

    def __init__(self, min_confidence: float = MIN_CONFIDENCE, min_variants: int = MIN_VARIANTS) -> None:
        self.min_confidence = min_confidence
        self.min_variants = min_variants
        self._admitted_keys: set[tuple[str, str]] = set()
        self._held: dict[tuple[str, str], _Held] = {}
        self._order = 0
        self._merged = SourceMerge()
        self._admitted = 0
        self._finished = False

    def add(self, source: common_pb2.SoundSource) -> common_pb2.SoundSource | None:
        if self._finished:
            raise RuntimeError("PostRules.add after finish")
        admitted: list[common_pb2.SoundVariant] = []
        for variant in source.variants:
            self._order += 1
            if is_vocal(source.name, variant.action):
                continue
            key = _dedupe_key(source.name, variant.action)
            if key in self._admitted_keys:
                continue
            confidence = _confidence(variant)
            held = self._held.get(key)
            if held is not None:
                if confidence <= held.confidence:
                    continue
                held.dropped = True  # the new one is more confident: it replaces the held one
                del self._held[key]
            if confidence >= self.min_confidence:
                self._admitted_keys.add(key)
                admitted.append(variant)
            else:
                self._held[key] = _Held(confidence, self._order, source, variant, key)
        if not admitted:
            return None
        return self._emit(source, admitted)

    def finish(self) -> list[common_pb2.SoundSource]:
        """Re-admit the most confident held-back variants until ``min_variants`` are admitted."""
        if self._finished:
            return []
        self._finished = True
        need = self.min_variants - self._admitted
        if need <= 0 or not self._held:
            return []
        chosen = sorted(self._held.values(), key=lambda h: (-h.confidence, h.order))[:need]
        chosen.sort(key=lambda h: h.order)
        events: list[common_pb2.SoundSource] = []
        by_source: dict[str, tuple[common_pb2.SoundSource, list[common_pb2.SoundVariant]]] = {}
        for held in chosen:
            entry = by_source.setdefault(held.source.id, (held.source, []))
            entry[1].append(held.variant)
            self._admitted_keys.add(held.key)
        for source, variants in by_source.values():
            events.append(self._emit(source, variants))
        return events

    def description(self, scene: str, mood: str) -> common_pb2.SceneDescription:
        desc = common_pb2.SceneDescription(scene=scene, mood=mood)
        desc.sources.extend(self._merged.sources())
        return desc

    def _emit(self, source: common_pb2.SoundSource, variants: list[common_pb2.SoundVariant]) -> common_pb2.SoundSource:
        event = common_pb2.SoundSource(id=source.id, name=source.name, material=source.material)
        if source.HasField("location"):
            event.location.CopyFrom(source.location)
        event.variants.extend(variants)
        self._admitted += len(variants)
        self._merged.add(event)
        return event


def apply_post_rules(
    desc: common_pb2.SceneDescription,
    *,
    min_confidence: float = MIN_CONFIDENCE,
    min_variants: int = MIN_VARIANTS,
) -> common_pb2.SceneDescription:
    """One-shot form of :class:`PostRules` over a description's sources (ids are kept)."""
    rules = PostRules(min_confidence, min_variants)
    for source in desc.sources:
        rules.add(source)
    rules.finish()
    out = rules.description(desc.scene, desc.mood)
    out.prompt_version = desc.prompt_version
    out.model_id = desc.model_id
    return out


# --------------------------------------------------------------------------------------------------
# The compact answer format (prompt v1; v2 has the same keys, sources first)
# --------------------------------------------------------------------------------------------------


def to_compact_dict(desc: common_pb2.SceneDescription) -> dict[str, Any]:
    """The compact JSON shape (what the model writes). Unset confidence is left out, unset role is "none"."""
    return {
        "scene": desc.scene,
        "mood": desc.mood,
        "sources": [
            {
                "name": s.name,
                "material": s.material,
                "variants": [
                    {
                        "action": v.action,
                        "timbre": list(v.timbre),
                        "role": _COMPACT_ROLE_NAME.get(v.instrument_role, "none"),
                        **({"confidence": round_confidence(v.confidence)} if v.HasField("confidence") else {}),
                    }
                    for v in s.variants
                ],
            }
            for s in desc.sources
        ],
    }


def description_from_dict(data: Mapping[str, Any], *, apply_rules: bool = True) -> common_pb2.SceneDescription:
    """A SceneDescription from a parsed JSON object in the compact v1 or the seed format; with
    ``apply_rules`` (the default) the post-rules run, without it everything usable is kept as written."""
    description = description_from_raw(data)
    if not apply_rules:
        return description
    rules = PostRules()
    for source in description.sources:
        rules.add(source)
    rules.finish()
    return rules.description(description.scene, description.mood)


def source_from_model(data: Mapping[str, Any], index: int, frame: boxes.PixelFrame | None = None
                      ) -> common_pb2.SoundSource | None:
    """One source as the model wrote it: its ``box`` is in pixels of ``frame`` (the image after the
    processor's resize) and becomes the normalised location here; without a frame (no boxes asked for)
    any box is ignored."""
    raw = dict(data)
    raw_box = raw.pop(boxes.BOX_KEY, None)
    source = seed_format.source_from_raw(raw, index)
    if source is not None and frame is not None:
        location = boxes.from_model_pixels(raw_box, frame)
        if location is not None:
            source.location.CopyFrom(location)
    return source
