"""The VLM backend interface: what a model behind the vision service does, in domain terms.

A backend turns a decoded RGB image into a ``SceneDescription`` (protos in ``image_to_sound.v1``),
either in one go (:meth:`VisionBackend.describe`) or as a stream of events (:meth:`VisionBackend.stream`):
one :class:`SceneHeader`, then :class:`SourceFound` events as sources are decoded (and, at the end, the
variants re-admitted by the at-least-five rule, under ids already sent), then one
:class:`DescriptionDone` whose description equals the merge of the SourceFound events by source id.

No torch here: the servicer and tests of orchestration import this module without a model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, Callable, Iterator, Literal

from PIL import Image

from image_to_sound.v1 import common_pb2
from i2s_formats.contract import DecodingOptions  # the backends' options, valid by construction

if TYPE_CHECKING:
    from serving.blocking import ModelWorker
    from serving.deadline import Deadline

@dataclass(frozen=True)
class SceneHeader:
    """First event of a stream: the scene and mood (cleaned; empty when the model produced none).

    Sent as soon as both are decoded. Should a source be complete first (only possible when output is
    not constrained to the schema's key order) or the generation end first, it goes out with what is known
    then, and the final description carries the values decoded later."""

    scene: str
    mood: str


@dataclass(frozen=True)
class SourceFound:
    """A sound source with the variants admitted by this event. A source id may come again later with
    more variants (re-admitted by the at-least-five rule); variant ids are never repeated."""

    source: common_pb2.SoundSource


FinishReason = Literal["stop", "length", "cancelled", "deadline"]


@dataclass(frozen=True)
class DescriptionDone:
    """Last event: the whole description (after the post-rules) and stats.

    ``finish_reason``: "stop" (the model finished the JSON), "length" (max_new_tokens reached: the
    description holds what was complete), "cancelled" (``should_stop`` returned True, or the caller left),
    "deadline" (the request's deadline passed). ``model_steps``: forwards of the model this request took
    part in (prefill included); fewer than ``output_tokens`` when grammar-forced tokens rode along (0:
    not counted by this backend).
    """

    description: common_pb2.SceneDescription
    prompt_tokens: int
    output_tokens: int
    time_to_first_token_seconds: float
    total_seconds: float
    finish_reason: FinishReason = "stop"
    model_steps: int = 0
    cache_hit: bool = False  # replayed from the result cache (vlm_service.description_cache): no model ran


StreamEvent = SceneHeader | SourceFound | DescriptionDone


class VisionBackend(ABC):
    """A model that describes an image's sound sources.

    Life cycle: construct (cheap, loads nothing) -> :meth:`load` -> :meth:`warmup` -> ``ready`` ->
    requests -> :meth:`close`. A backend takes ``concurrent_requests`` calls at once (by default one:
    calls are serialised); :meth:`stream` is a blocking generator meant to run in a worker thread, and
    :meth:`astream` runs it on the service's worker, which has that many threads. A backend that queues
    and schedules concurrent requests itself (the transformers one) overrides :meth:`astream`.
    """

    model_id: str
    prompt_version: str
    # How many requests the servicer sends at once: its worker gets that many threads. None for a backend
    # that queues and schedules its requests itself (bounded by its own max_queue): the servicer then puts
    # no worker queue in front of it, so one queue stands before each model.
    concurrent_requests: int | None = 1
    model_revision: str | None = None  # the loaded weights (serving.models.checkpoint_revision); None: unknown

    @property
    def queue_depth(self) -> int:
        """Requests accepted and not yet started, for a backend that queues them itself (``concurrent_requests``
        None); a backend the servicer's worker queues for has none of its own."""
        return 0

    def result_identity(self) -> dict | None:
        """What decides a description besides the image and decoding options: the model (id and revision),
        the prompt version and the settings of this backend that change the tokens. Part of every
        result-cache key; None (revision unknown): no caching."""
        if self.model_revision is None:
            return None
        return {"model_id": self.model_id, "revision": self.model_revision, "prompt_version": self.prompt_version}
    # Which path serves, once warm (serving.fast_path.report; the engine's: its decode step), and why it is
    # not the one asked for, if it is not.
    serving_path: str = "remote"
    serving_path_reason: str | None = None

    @abstractmethod
    def load(self) -> None:
        """Load weights, processor and grammar. Blocking; may take minutes for real checkpoints."""

    @property
    @abstractmethod
    def ready(self) -> bool:
        """True once loaded and warmed up, until closed."""

    @abstractmethod
    def warmup(self) -> None:
        """Run a short generation so the first request does not pay one-off costs."""

    @abstractmethod
    def stream(
        self,
        image: Image.Image,
        options: DecodingOptions,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[StreamEvent]:
        """Describe ``image`` (decoded, RGB, size-checked), yielding SceneHeader, then SourceFound
        events, then exactly one DescriptionDone.

        ``should_stop`` is polled before generation and after every model step (possibly from another
        thread; a step adds one token, or several when grammar-forced tokens ride along); when it returns
        True generation stops and the stream ends with a
        DescriptionDone whose finish_reason is "cancelled". Closing the generator early also stops
        generation. Raises, when called (before the first event): InvalidInput
        for an image the model cannot take, NotReady before :meth:`load` or after :meth:`close`.
        """

    async def astream(self, image: Image.Image, options: DecodingOptions, worker: "ModelWorker | None",
                      deadline: "Deadline | None" = None, priority: str = "interactive") -> AsyncIterator[StreamEvent]:
        """:meth:`stream` for asyncio callers: on a thread of ``worker`` (``concurrent_requests`` of them),
        stopped when the caller leaves. A backend that can stop at ``deadline`` ends with finish_reason "deadline".
        A backend that schedules itself serves ``priority`` (serving.priority) first; this one, in arrival order."""
        async for event in worker.stream(lambda should_stop: self.stream(image, options, should_stop)):
            yield event

    def describe(self, image: Image.Image, options: DecodingOptions) -> DescriptionDone:
        """Describe ``image`` in one go (drains :meth:`stream`)."""
        done: DescriptionDone | None = None
        for event in self.stream(image, options):
            if isinstance(event, DescriptionDone):
                done = event
        if done is None:  # pragma: no cover - a backend bug
            raise RuntimeError("stream ended without DescriptionDone")
        return done

    @abstractmethod
    def close(self) -> None:
        """Release the model (idempotent)."""
