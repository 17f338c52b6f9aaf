"""Prompt construction: a described sound variant → a short AudioCaps-style caption for AudioLDM2.

AudioLDM2 was trained on captions of about ten words ("A dog barks while rain falls on a tin roof"),
and its CLAP text encoder reads 77 tokens in training. The seed sent 150-180 words, mostly instructions.
Here a caption names the source, its material and the action, adds up to three timbre words and a
short scene context, and nothing else. The scene is optional: with prompt v2 the sources come before
the scene, and their captions go without it.

    Rain drumming on the tin roof, sharp, metallic, steady, on a stormy night in a small town

Rules (PROMPT_STYLE_VERSION "caption-v1"):
- Pure and deterministic; no protobuf, no model. Strings are cleaned first (VLM output may carry control
  characters, quotes, odd whitespace): Unicode NFKC, control/format characters and quotes removed.
- No music: the instrument role is metadata for Phase 2, never caption text; music and instrument words
  in any field are dropped ("bass" becomes "low", a computer "keyboard" becomes "keys").
- Material: for things that hit or move over a surface (rain, footsteps, waves…) it is the surface
  ("on the tin roof"); otherwise it qualifies the source ("wooden door"). Uninformative materials
  ("organic", "fur", "n/a") are left out.
- Short by construction: at most MAX_CAPTION_WORDS words (the scene context goes first, then timbre
  words, last first), so a caption of ordinary words fits CLAP's 77 tokens with no tokenizer needed here.

PROMPT_STYLE_VERSION names these rules; the orchestrator sends it with every clip (ClipDone.prompt_style)
and the command line records it in prompts.json, so a clip can be traced to the rules that captioned it.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

PROMPT_STYLE_VERSION = "caption-v1"
MAX_TIMBRE_WORDS = 3
MAX_CAPTION_WORDS = 20


# Whole words dropped from every part of a caption (the instrument role never reaches it either).
MUSIC_WORDS = frozenset(
    """
    music musical musically musician musicians melody melodies melodic song songs singing sing sings sung singer
    singers choir chord chords harmony harmonies harmonic harmonious tune tunes tuneful instrument instruments
    instrumental guitar guitars guitarist piano pianos pianist drum drums drummer drumkit synth synths synthesizer
    synthesizers violin violins cello cellos orchestra orchestral symphony saxophone trumpet trumpets flute flutes
    ukulele banjo
    """.split()
)
# Words with a non-musical meaning worth keeping.
MUSIC_WORD_REPLACEMENTS = {"bass": "low", "keyboard": "keys", "keyboards": "keys"}

# Sources whose "material" is the surface they hit or move over.
SURFACE_SOURCES = frozenset(
    """
    rain raindrops raindrop drops droplets drizzle hail hailstones sleet footsteps footstep steps feet boots shoes
    heels paws hooves waves wave surf wheels wheel tires tyres skateboard ball broom rake
    """.split()
)
SURFACE_PREPOSITIONS = ("on", "onto", "against", "over", "across", "along", "upon", "into", "through", "under")
# Materials that say nothing about the sound.
UNINFORMATIVE_MATERIALS = frozenset(
    """
    none n a na n-a unknown various mixed other unspecified organic biological living animal flesh fur feathers
    feather skin body human tissue natural air gas sound noise
    """.split()
)
SURFACE_SELF_MATERIALS = frozenset({"water", "liquid", "fluid", "ice"})
MATERIAL_ADJECTIVES = {"wood": "wooden", "wool": "woollen", "gold": "golden"}

_FUNCTION_WORDS = frozenset(
    "a an the of with and or in on at by near to for while where that which is are was were during from under over "
    "into onto its their his her as".split()
)
_LOCATIVE_STARTS = frozenset(
    "in at on inside outside outdoors indoors near by under along beside underwater during across within".split()
)
_SCENE_LEADS = (
    "the image shows", "the image depicts", "this image shows", "the picture shows", "the photo shows",
    "the scene shows", "the scene depicts", "the scene is", "this scene is", "this is", "it is", "there is",
    "there are", "a photo of", "a picture of", "an image of", "a view of", "we see", "shows", "depicts",
)
_QUOTES = "\"'`´‘’‚‛“”„‟«»‹›′″"
_CLAUSE_BREAK = re.compile(r"[.;:!?,()\[\]{}]| with | where | while | which | that | and ")


@dataclass(frozen=True)
class SoundVariant:
    """What the VLM said about one way a source sounds (the seed's JSON, one variant)."""

    name: str
    material: str = ""
    action: str = ""  # the seed's "play_method"
    timbre: tuple[str, ...] = ()
    instrument_role: str | None = None  # guitar | bass | keyboard | drums | None: metadata, never caption text


# -- cleaning -------------------------------------------------------------------------------------------


def clean_text(text: Any) -> str:
    """NFKC, control/format characters → space, quotes removed, whitespace collapsed. Keeps case."""
    if text is None:
        return ""
    text = unicodedata.normalize("NFKC", str(text))
    out = []
    for ch in text:
        if ch in _QUOTES:
            continue
        category = unicodedata.category(ch)
        if category[0] == "C" or category in ("Zl", "Zp"):
            out.append(" ")
        else:
            out.append(ch)
    return " ".join("".join(out).split())


def _words(text: Any, max_words: int, *, drop_music: bool = True) -> list[str]:
    """Lowercase words of a phrase: letters, digits and inner hyphens only; music words dropped."""
    text = clean_text(text).lower().replace("_", " ")
    text = re.sub(r"[^\w\s-]|_", " ", text)
    words = []
    for raw in text.split():
        word = raw.strip("-")[:30]
        if not word:
            continue
        if drop_music:
            word = MUSIC_WORD_REPLACEMENTS.get(word, word)
            if word in MUSIC_WORDS:
                continue
        words.append(word)
    words = words[:max_words]
    # No dangling function words at the end ("drumming on the").
    while words and words[-1] in _FUNCTION_WORDS:
        words.pop()
    return words


def _mentions(haystack: Sequence[str], needle: Sequence[str]) -> bool:
    """Whether the content words of `needle` already appear in `haystack` (prefix match: wood ~ wooden)."""
    content = [w for w in needle if w not in _FUNCTION_WORDS]
    if not content:
        return True
    return all(any(h.startswith(w) or w.startswith(h) for h in haystack if len(h) > 2) for w in content)


# -- parts ----------------------------------------------------------------------------------------------


def scene_context(scene: Any, max_words: int = 7) -> str:
    """A short locative phrase from a scene description: 'A cozy kitchen in the morning…' → 'in a cozy kitchen in the morning'."""
    text = " " + clean_text(scene).lower().replace("_", " ") + " "
    text = _CLAUSE_BREAK.split(text, maxsplit=1)[0].strip()
    for lead in _SCENE_LEADS:
        if text.startswith(lead + " "):
            text = text[len(lead) + 1 :]
            break
    words = _words(text, 30)
    if len(words) > max_words:
        # Cut at a phrase boundary, not mid-phrase: "a quiet garden path in the late afternoon" → "a quiet garden path".
        words = words[:max_words]
        cut = max((i for i, w in enumerate(words) if w in _FUNCTION_WORDS and i >= 2), default=None)
        if cut is not None:
            words = words[:cut]
        while words and words[-1] in _FUNCTION_WORDS:
            words.pop()
    if not words:
        return ""
    if words[0] in _LOCATIVE_STARTS:
        return " ".join(words)
    if words[0] in ("a", "an", "the"):
        if len(words) == 1:
            return ""
        return "in " + " ".join(words)
    return "in the " + " ".join(words)


def _subject_and_action(name: list[str], material: list[str], action: list[str]) -> tuple[list[str], list[str]]:
    if not material or " ".join(material) in UNINFORMATIVE_MATERIALS or all(m in UNINFORMATIVE_MATERIALS for m in material):
        return name, action
    if _mentions(name + action, material):
        return name, action
    # Only the words not said yet: material "tin roof" + "drumming on the roof" → "on the tin roof".
    material = [m for m in material if m in _FUNCTION_WORDS or not _mentions(name + action, [m])]
    surface = any(w in SURFACE_SOURCES for w in name)
    if surface:
        if all(m in SURFACE_SELF_MATERIALS for m in material):
            return name, action
        for i, word in enumerate(action):
            if word in SURFACE_PREPOSITIONS:
                j = i + 1
                if j < len(action) and action[j] in ("a", "an", "the"):
                    j += 1
                return name, action[:j] + material + action[j:]
        return name, action + ["on"] + material
    if len(material) == 1 and material[0] in MATERIAL_ADJECTIVES:
        material = [MATERIAL_ADJECTIVES[material[0]]]
    return material + name, action


def _timbre_words(timbre: Iterable[Any], taken: Sequence[str]) -> list[str]:
    if isinstance(timbre, str):
        timbre = [timbre]
    out: list[str] = []
    seen = set(taken)
    for item in timbre or ():
        words = _words(item, 3)
        phrase = " ".join(words)
        if not phrase or phrase in out or all(w in seen for w in words):
            continue
        out.append(phrase)
        seen.update(words)
        if len(out) == MAX_TIMBRE_WORDS:
            break
    return out


def _render(subject: list[str], action: list[str], timbre: list[str], scene: str) -> str:
    core = " ".join(subject + action) if action else " ".join(subject) + " sound"
    parts = [core] + timbre + ([scene] if scene else [])
    caption = ", ".join(parts)
    return caption[:1].upper() + caption[1:]


# -- public ---------------------------------------------------------------------------------------------


def build_caption(variant: SoundVariant, scene: str = "", mood: str = "") -> str:
    """The caption for one variant (see the module docstring). `mood` is not sound and is not used.
    Raises ValueError when the source has no usable name."""
    del mood  # a mood is not a sound; kept in the signature so callers pass the whole description
    name = _words(variant.name, 5)
    if not name:
        if not _words(variant.name, 5, drop_music=False):
            raise ValueError(f"sound source name {variant.name!r} has no usable words")
        name = ["object"]  # the source is an instrument ("guitar"): describe the object, not the music
    subject, action = _subject_and_action(name, _words(variant.material, 3), _words(variant.action, 8))
    timbre = _timbre_words(variant.timbre, subject + action)
    scene_phrase = scene_context(scene)

    # AudioCaps-short, and so inside CLAP's 77 tokens: the scene goes first, then timbre words.
    def n_words(t: list[str], s: str) -> int:
        return len(" ".join(subject + action + t + [s]).split())

    while scene_phrase and n_words(timbre, scene_phrase) > MAX_CAPTION_WORDS:
        scene_phrase = ""
    while timbre and n_words(timbre, scene_phrase) > MAX_CAPTION_WORDS:
        timbre = timbre[:-1]

    return _render(subject, action, timbre, scene_phrase)


def caption_for_variant(scene: str, mood: str, source: Any, variant: Any) -> str:
    """`build_caption` for any objects with the contract's field names (source.name/.material,
    variant.action/.timbre), e.g. the SoundSource and SoundVariant messages, without importing them."""
    return build_caption(
        SoundVariant(
            name=getattr(source, "name", "") or "",
            material=getattr(source, "material", "") or "",
            action=getattr(variant, "action", None) or getattr(variant, "play_method", "") or "",
            timbre=tuple(getattr(variant, "timbre", ()) or ()),
        ),
        scene,
        mood,
    )

