"""The one merge of streamed sound sources (the VLM's final description, the orchestrator, the client and the
Triton VLM backend all fold a stream of source events with it).

A stream names a source once with its first variants and may name it again with more (the seed's re-admitted
variants come last). What the stream adds up to: sources by id, in order of first appearance; a source's
first sighting gives its fields (name, material, location, ...); every sighting adds the variants whose ids
are new.
"""
from __future__ import annotations

from typing import Iterable

from image_to_sound.v1 import common_pb2


class SourceMerge:
    def __init__(self) -> None:
        self._sources: dict[str, common_pb2.SoundSource] = {}
        self._variant_ids: set[str] = set()

    def add(self, event: common_pb2.SoundSource) -> tuple[common_pb2.SoundSource, list[common_pb2.SoundVariant]]:
        """Folds one source event in; returns the merged source and the variants new in this event."""
        merged = self._sources.get(event.id)
        if merged is None:
            merged = self._sources[event.id] = common_pb2.SoundSource()
            merged.CopyFrom(event)
            del merged.variants[:]
        new = [v for v in event.variants if not v.id or v.id not in self._variant_ids]
        self._variant_ids.update(v.id for v in new)
        merged.variants.extend(new)
        return merged, new

    def get(self, source_id: str) -> common_pb2.SoundSource | None:
        return self._sources.get(source_id)

    def sources(self) -> list[common_pb2.SoundSource]:
        return list(self._sources.values())

    def __len__(self) -> int:
        return len(self._sources)


def merge_sources(events: Iterable[common_pb2.SoundSource]) -> list[common_pb2.SoundSource]:
    """The sources a stream of source events adds up to, in order of first appearance."""
    merge = SourceMerge()
    for event in events:
        merge.add(event)
    return merge.sources()
