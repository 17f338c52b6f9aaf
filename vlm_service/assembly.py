"""Token ids in, stream events out: detokenize, parse the JSON as it grows, apply the post-rules.

Runs in whoever consumes a request (the caller's thread, or the event loop), not on the model thread:
the model thread only hands over token ids. Pure Python apart from the tokenizer's decode.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Iterable

from i2s_formats import boxes, seed_format
from vlm_service import rules
from vlm_service.backend import DescriptionDone, SceneHeader, SourceFound, StreamEvent
from vlm_service.detokenizer import IncrementalDetokenizer
from vlm_service.json_stream import JsonStreamParser, ParsedHeader, ParsedSource

log = logging.getLogger(__name__)


class DescriptionAssembler:
    """One request's events from its tokens: :meth:`tokens` as they come, then :meth:`finish` once."""

    def __init__(self, tokenizer: Any, *, prompt_version: str, model_id: str, prompt_tokens: int,
                 started: float, max_new_tokens: int, quiet: bool = False,
                 frame: boxes.PixelFrame | None = None) -> None:
        self._detok = IncrementalDetokenizer(lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
        self._parser = JsonStreamParser()
        self._post = rules.PostRules()
        self.prompt_version, self.model_id = prompt_version, model_id
        self.prompt_tokens = prompt_tokens
        self.started = started
        self.max_new_tokens = max_new_tokens
        self.quiet = quiet
        self.frame = frame  # set when the request asked for boxes: the model's pixel frame
        self.output_tokens = 0
        self.first_token_at: float | None = None

    def tokens(self, ids: Iterable[int]) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        for token_id in ids:
            self.output_tokens += 1
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            piece = self._detok.push(token_id)
            if piece:
                events.extend(self._handle(self._parser.feed(piece)))
        return events

    def finish(self, reason: str, model_steps: int = 0) -> list[StreamEvent]:
        """The remaining events and the DescriptionDone. ``reason``: why decoding ended ("stop" when the
        model ended, "length", "cancelled", "deadline"); "stop" stands only if the JSON is complete."""
        events: list[StreamEvent] = []
        tail = self._detok.flush()
        if tail:
            events.extend(self._handle(self._parser.feed(tail)))
        events.extend(self._handle(self._parser.close()))
        events.extend(SourceFound(extra) for extra in self._post.finish())
        if self._parser.complete:
            finish_reason = "stop"
        elif reason in ("cancelled", "deadline"):
            finish_reason = reason
        else:
            finish_reason = "length"
            if not self.quiet:
                log.warning("generation hit max_new_tokens=%d before the JSON was complete", self.max_new_tokens)
        # The parser's final values: equal to the header's, unless sources came before scene/mood (prompt v2,
        # or no grammar), which sends the header early with what was known then.
        description = self._post.description(
            seed_format.clean_text(self._parser.scene or "", seed_format.MAX_SCENE_CHARS),
            seed_format.clean_text(self._parser.mood or "", seed_format.MAX_MOOD_CHARS),
        )
        description.prompt_version = self.prompt_version
        description.model_id = self.model_id
        finished = time.perf_counter()
        events.append(DescriptionDone(
            description=description,
            prompt_tokens=self.prompt_tokens,
            output_tokens=self.output_tokens,
            time_to_first_token_seconds=(self.first_token_at or finished) - self.started,
            total_seconds=finished - self.started,
            finish_reason=finish_reason,
            model_steps=model_steps,
        ))
        return events

    def _handle(self, parsed) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        for event in parsed:
            if isinstance(event, ParsedHeader):
                events.append(SceneHeader(
                    scene=seed_format.clean_text(event.scene, seed_format.MAX_SCENE_CHARS),
                    mood=seed_format.clean_text(event.mood, seed_format.MAX_MOOD_CHARS),
                ))
            elif isinstance(event, ParsedSource):
                source = rules.source_from_model(event.data, event.index, self.frame)
                admitted = self._post.add(source) if source is not None else None
                if admitted is not None:
                    events.append(SourceFound(admitted))
        return events
