"""Token ids to text pieces as they are generated, never splitting a multi-byte character."""

from __future__ import annotations

from typing import Callable, Sequence


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
