"""The incremental JSON stream parser: turns the model's answer, as its text grows, into the scene header and
one event per sound source the moment each closes. Pure Python (no torch), so any backend (in-process or a
Triton client) can use it."""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from typing import Any

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
