"""Decoding helpers: the incremental JSON stream parser and the grammar constraint (sampling:
:mod:`vlm_service.sampling`).

The stream parser is pure Python (no torch), so any backend (in-process or a Triton client) can use it.
The xgrammar / torch parts import their dependencies lazily.

xgrammar 0.2.8 facts this module relies on (checked against the installed package):
- ``TokenizerInfo.from_huggingface`` does *not* mark Qwen's added tokens (``<|image_pad|>``,
  ``<|vision_start|>``, ``<|im_start|>``...) as special: inside a JSON string the grammar allows them as
  literal text. :func:`build_tokenizer_info` blanks every added token except the stop tokens, which
  makes xgrammar treat them as special (never allowed).
- ``compile_json_schema`` enforces minLength/maxLength, minItems/maxItems, enum and number
  minimum/maximum (numbers get at most 6 fraction digits, no exponent). With a maxLength, escapes
  (``\\n``, ``\\"``, ``\\uXXXX``) are not allowed inside the string, but raw control characters
  (U+0001, TAB, DEL) are: parse with ``json.loads(strict=False)`` and clean strings afterwards.
- ``GrammarMatcher.accept_token`` returns False for a token the grammar rejects;
  ``fill_next_token_bitmask`` writes into a CPU int32 bitmask from ``allocate_token_bitmask``;
  ``apply_token_bitmask_inplace`` needs logits and bitmask on the same device (CPU kernel on CPU,
  Triton on CUDA).
"""

from __future__ import annotations

import codecs
import json
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

SCENE_KEYS = frozenset({"scene", "scene_description"})
MOOD_KEYS = frozenset({"mood", "mood_description"})
SOURCES_KEYS = frozenset({"sources", "sound_sources", "objects"})


# --------------------------------------------------------------------------------------------------
# Incremental JSON stream parser
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedHeader:
    """Scene and mood as decoded (raw, uncleaned); empty string when the model did not produce one."""

    scene: str
    mood: str


@dataclass(frozen=True)
class ParsedSource:
    """One complete source object. ``index`` is its 1-based position in the sources array."""

    index: int
    data: dict[str, Any]


class _Frame:
    __slots__ = ("kind", "expect", "key", "start", "is_sources", "capture")

    def __init__(self, kind: str, start: int) -> None:
        self.kind = kind  # "obj" or "arr"
        self.expect = "key"  # objects: "key" | "colon" | "value" | "comma"
        self.key: str | None = None
        self.start = start
        self.is_sources = False  # arrays: the top-level sources list
        self.capture = False  # objects: an element of the sources list


class JsonStreamParser:
    """Scans model output text as it arrives and reports complete parts of the description.

    Feed it text (``str``) or raw bytes (decoded incrementally as UTF-8, so a character split across
    pieces is fine) in arbitrary pieces. It emits:

    - one :class:`ParsedHeader`, as soon as the top-level ``scene`` and ``mood`` strings are both
      complete (aliases ``scene_description`` / ``mood_description``). It is always emitted before the
      first source: if a source completes first, the header goes out with what is known (possibly empty
      strings), and at :meth:`close` if it never went out;
    - one :class:`ParsedSource` per element of the top-level ``sources`` array (aliases
      ``sound_sources``, ``objects``) the moment its closing ``}`` arrives.

    Text before the first ``{`` (prose, a code fence) and after the top-level object closes is ignored.
    It tracks strings and escapes itself, so braces inside strings do not confuse it. Raw control
    characters inside strings are accepted (``json.loads(strict=False)``).
    """

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = ""
        self._pos = 0
        self._stack: list[_Frame] = []
        self._started = False
        self._finished = False
        self._in_string = False
        self._escape = False
        self._string_start = -1
        self._scene: str | None = None
        self._mood: str | None = None
        self._header_sent = False
        self._sources_seen = 0
        self._closed = False

    @property
    def text(self) -> str:
        """All text fed so far."""
        return self._text

    @property
    def complete(self) -> bool:
        """Whether the top-level JSON object has been closed."""
        return self._finished

    @property
    def scene(self) -> str | None:
        return self._scene

    @property
    def mood(self) -> str | None:
        return self._mood

    def feed(self, piece: str | bytes) -> list[ParsedHeader | ParsedSource]:
        if self._closed:
            raise RuntimeError("parser is closed")
        if isinstance(piece, (bytes, bytearray)):
            piece = self._utf8.decode(bytes(piece))
        if not piece:
            return []
        self._text += piece
        return self._scan()

    def close(self) -> list[ParsedHeader | ParsedSource]:
        """Flush pending bytes; emit the header if it never went out. Idempotent."""
        if self._closed:
            return []
        tail = self._utf8.decode(b"", final=True)
        events: list[ParsedHeader | ParsedSource] = []
        if tail:
            self._text += tail
            events.extend(self._scan())
        self._closed = True
        if not self._header_sent:
            events.append(self._header())
        return events

    # -- internals ---------------------------------------------------------------------------------

    def _header(self) -> ParsedHeader:
        self._header_sent = True
        return ParsedHeader(scene=self._scene or "", mood=self._mood or "")

    def _scan(self) -> list[ParsedHeader | ParsedSource]:
        events: list[ParsedHeader | ParsedSource] = []
        text = self._text
        i = self._pos
        n = len(text)
        while i < n:
            if self._finished:
                i = n
                break
            c = text[i]
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif c == "\\":
                    self._escape = True
                elif c == '"':
                    self._in_string = False
                    self._on_string(text[self._string_start : i + 1], events)
                i += 1
                continue
            if not self._started:
                if c == "{":
                    self._started = True
                    self._stack.append(_Frame("obj", i))
                i += 1
                continue
            top = self._stack[-1]
            if c == '"':
                self._in_string = True
                self._escape = False
                self._string_start = i
            elif c == "{":
                frame = _Frame("obj", i)
                if top.kind == "arr" and top.is_sources:
                    frame.capture = True
                    self._sources_seen += 1
                self._stack.append(frame)
            elif c == "[":
                frame = _Frame("arr", i)
                if top.kind == "obj" and len(self._stack) == 1 and top.key in SOURCES_KEYS:
                    frame.is_sources = True
                self._stack.append(frame)
            elif c in "}]":
                frame = self._stack.pop()
                if frame.capture and c == "}":
                    self._on_source(text[frame.start : i + 1], events)
                if not self._stack:
                    self._finished = True
                else:
                    parent = self._stack[-1]
                    if parent.kind == "obj":
                        parent.expect = "comma"
            elif c == ":":
                if top.kind == "obj":
                    top.expect = "value"
            elif c == ",":
                if top.kind == "obj":
                    top.expect = "key"
                    top.key = None
            i += 1
        self._pos = i
        return events

    def _on_string(self, raw: str, events: list) -> None:
        top = self._stack[-1]
        try:
            value = json.loads(raw, strict=False)
        except ValueError:
            value = raw[1:-1]
        if top.kind == "obj" and top.expect == "key":
            top.key = value.lower() if isinstance(value, str) else None
            top.expect = "colon"
            return
        if top.kind == "obj":
            top.expect = "comma"
            if len(self._stack) == 1 and isinstance(value, str):
                if top.key in SCENE_KEYS and self._scene is None:
                    self._scene = value
                elif top.key in MOOD_KEYS and self._mood is None:
                    self._mood = value
                if not self._header_sent and self._scene is not None and self._mood is not None:
                    events.append(self._header())

    def _on_source(self, raw: str, events: list) -> None:
        index = self._sources_seen
        try:
            data = json.loads(raw, strict=False)
        except ValueError:
            return
        if not isinstance(data, dict):
            return
        if not self._header_sent:
            events.append(self._header())
        events.append(ParsedSource(index=index, data=data))


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text pieces, never splitting a multi-byte character.

    The usual prefix/read-offset scheme (as in text-generation-inference): decode a small window and
    emit the new suffix only when it does not end in an incomplete character (U+FFFD).
    """

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            piece = new_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return piece
        return ""

    def flush(self) -> str:
        """Whatever is left at the end (possibly with replacement characters)."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""


# --------------------------------------------------------------------------------------------------
# xgrammar constraint and sampling (torch / xgrammar imported lazily)
# --------------------------------------------------------------------------------------------------


def build_tokenizer_info(tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]):
    """xgrammar TokenizerInfo for a Hugging Face tokenizer, with every added token except the stop tokens
    blanked (so xgrammar treats them as special and never lets them into the JSON text).

    ``vocab_size`` is the model's LM-head size (151936 / 152064 for Qwen2.5-VL, more than the tokenizer's).
    """
    import xgrammar as xgr

    stops = [int(t) for t in stop_token_ids]
    detected = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stops)
    added_ids = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    added_ids.update(int(i) for i in (getattr(tokenizer, "all_special_ids", None) or []))
    encoded = [""] * vocab_size
    for token, idx in tokenizer.get_vocab().items():
        if idx < vocab_size and idx not in added_ids:
            encoded[idx] = token
    return xgr.TokenizerInfo(
        encoded,
        vocab_type=detected.vocab_type,
        vocab_size=vocab_size,
        stop_token_ids=stops,
        add_prefix_space=detected.add_prefix_space,
    )


def compile_schema(tokenizer_info: Any, schema: dict) -> Any:
    """Compile the JSON schema into an xgrammar grammar: compact separators, no free whitespace (fewest
    tokens, and a random-weight model cannot wander in whitespace), properties in schema order."""
    import xgrammar as xgr

    compiler = xgr.GrammarCompiler(tokenizer_info, max_threads=2)
    return compiler.compile_json_schema(
        json.dumps(schema), any_whitespace=False, separators=(",", ":"), strict_mode=True
    )


class GrammarLogitsProcessor:
    """Hugging Face logits processor that keeps generation inside an xgrammar grammar (batch size 1).

    On each call it first accepts the tokens generated since the previous call (the last one of
    ``input_ids``), then fills the next-token bitmask and masks the logits in place. One instance per
    generation. Raises RuntimeError if a token outside the grammar shows up (a bug elsewhere).
    """

    def __init__(self, compiled_grammar: Any, vocab_size: int) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.matcher = xgr.GrammarMatcher(compiled_grammar)
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self._vocab_size = vocab_size
        self._prompt_len: int | None = None
        self._accepted = 0
        self._device_mask = None

    def __call__(self, input_ids, scores):
        if input_ids.shape[0] != 1:
            raise ValueError("GrammarLogitsProcessor supports batch size 1")
        if self._prompt_len is None:
            self._prompt_len = int(input_ids.shape[1])
        new_tokens = input_ids[0, self._prompt_len + self._accepted :].tolist()
        for token in new_tokens:
            if not self.matcher.accept_token(int(token)):
                raise RuntimeError(f"token {token} rejected by the grammar")
            self._accepted += 1
        if self.matcher.is_terminated():
            return scores
        self.matcher.fill_next_token_bitmask(self._bitmask)
        mask = self._bitmask if scores.device.type == "cpu" else self._bitmask.to(scores.device, non_blocking=True)
        try:
            self._xgr.apply_token_bitmask_inplace(scores, mask, vocab_size=self._vocab_size)
        except (ImportError, RuntimeError):  # e.g. no Triton on this CUDA host
            self._xgr.apply_token_bitmask_inplace(
                scores, mask, vocab_size=self._vocab_size, backend="torch_native"
            )
        return scores


class StopCriterion:
    """Hugging Face stopping criterion: stop as soon as any of the given callables returns True."""

    def __init__(self, *checks: Callable[[], bool] | None) -> None:
        self._checks = [c for c in checks if c is not None]
        self.triggered = threading.Event()

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        stop = any(check() for check in self._checks)
        if stop:
            self.triggered.set()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)
