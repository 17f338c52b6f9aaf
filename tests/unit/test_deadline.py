"""One deadline, edge to model (serving/deadline.py), with FAKE backends (no model): a description cut by its
deadline answers DEADLINE_EXCEEDED after what it streamed; an audio request whose deadline passes while it
waits in the batcher is never rendered. The same with the tiny real VLM: tests/integration/test_vlm_service.py."""
from __future__ import annotations

import asyncio

import pytest

from audio_service.backend import AudioRequest
from audio_service.batching import Batcher
from audio_service.config import AudioConfig
from audio_service.server import AudioServicer
from image_to_sound.v1 import audio_pb2, common_pb2, vision_pb2
from serving.deadline import Deadline
from serving.errors import DeadlineExceeded
from tests.real_stack import png
from tests.unit.test_batching import WAIT, FakeCountingAudioBackend
from vlm_service.backend import DescriptionDone, SceneHeader, SourceFound, VisionBackend
from vlm_service.config import VlmConfig
from vlm_service.server import VisionServicer


class Context:
    def __init__(self, remaining: float | None):
        self.remaining = remaining

    def time_remaining(self):
        return self.remaining

    def set_trailing_metadata(self, metadata):
        pass


def test_a_deadline_from_the_call_or_the_default():
    assert Deadline.from_context(Context(None)).at is None and Deadline().left() is None
    assert 0 < Deadline.from_context(Context(None), default_seconds=600).left() <= 600
    assert 0 < Deadline.from_context(Context(5.0), default_seconds=600).left() <= 5
    passed = Deadline.after(-1)
    assert passed.expired() and passed.remaining() == 0
    with pytest.raises(DeadlineExceeded):
        passed.left()


class FakeCutVisionBackend(VisionBackend):
    """NOT a model: streams a header and one source, then ends as the engine does when a row's deadline
    passes; records the deadline it was handed."""

    model_id, prompt_version = "fake", "fake"
    ready = True

    def __init__(self):
        self.deadlines: list[Deadline | None] = []

    def load(self): pass
    def warmup(self): pass
    def close(self): pass
    def stream(self, image, options, should_stop=None): raise AssertionError("astream is used")

    async def astream(self, image, options, worker, deadline=None, priority="interactive"):
        self.deadlines.append(deadline)
        description = common_pb2.SceneDescription(scene="a street")
        source = description.sources.add(id="s1", name="bell")
        yield SceneHeader(scene="a street", mood="")
        yield SourceFound(source=source)
        yield DescriptionDone(description=description, prompt_tokens=10, output_tokens=7,
                              time_to_first_token_seconds=0.1, total_seconds=0.5, finish_reason="deadline")


@pytest.mark.asyncio
async def test_a_description_cut_by_its_deadline_is_deadline_exceeded_after_what_it_streamed():
    backend = FakeCutVisionBackend()
    servicer = VisionServicer(backend, VlmConfig())
    request = vision_pb2.StreamSceneDescriptionRequest(image=common_pb2.Image(data=png()))
    kinds = []
    with pytest.raises(DeadlineExceeded, match="after 7 tokens"):
        async for event in servicer.StreamSceneDescription(request, Context(30.0)):
            kinds.append(event.WhichOneof("event"))
    assert kinds == ["scene", "source"]  # what was decoded went out; no final claims a whole description
    with pytest.raises(DeadlineExceeded):
        await servicer.DescribeScene(vision_pb2.DescribeSceneRequest(image=request.image), Context(30.0))
    assert all(isinstance(d, Deadline) and 0 < d.remaining() <= 30 for d in backend.deadlines)  # the call's own
    servicer.close()


def _request(seed: int) -> AudioRequest:
    return AudioRequest(prompt="rain", duration_seconds=1.0, num_inference_steps=2, seed=seed)


@pytest.mark.asyncio
async def test_an_audio_request_whose_deadline_passes_in_the_batcher_is_never_rendered():
    backend = FakeCountingAudioBackend(gated=True)
    batcher = Batcher(backend, max_batch_size=1, max_wait_ms=0)
    running = asyncio.create_task(batcher.submit(_request(1)))
    assert await asyncio.to_thread(backend.started.wait, WAIT)  # the model is busy with the first request
    with pytest.raises(DeadlineExceeded):  # waits behind it until its deadline passes
        await asyncio.wait_for(batcher.submit(_request(2), deadline=Deadline.after(0.2)), WAIT)
    assert batcher.queue_depth == 0  # dropped from the queue at once
    backend.proceed.set()  # let the first one finish
    await asyncio.wait_for(running, WAIT)
    await batcher.wait_idle()
    assert [[r.seed for r in call] for call in backend.calls] == [[1]]  # the late request never reached the model
    with pytest.raises(DeadlineExceeded):  # one already past is not even queued
        await batcher.submit(_request(3), deadline=Deadline.after(-1))
    assert [[r.seed for r in call] for call in backend.calls] == [[1]]
    await batcher.close()


@pytest.mark.asyncio
async def test_the_audio_servicer_hands_the_calls_deadline_to_the_batcher():
    backend = FakeCountingAudioBackend(gated=True)
    servicer = AudioServicer(backend, AudioConfig(max_batch_size=1, max_wait_ms=0))
    settings = common_pb2.AudioSettings(duration_seconds=1, num_inference_steps=2, seed=1)

    async def generate(seed: int, remaining: float | None):
        settings.seed = seed
        request = audio_pb2.GenerateAudioRequest(prompt="rain", settings=settings)
        return [r async for r in servicer.GenerateAudio(request, Context(remaining))]

    first = asyncio.create_task(generate(1, None))
    assert await asyncio.to_thread(backend.started.wait, WAIT)
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(generate(2, 0.2), WAIT)
    backend.proceed.set()
    assert any(r.HasField("chunk") for r in await asyncio.wait_for(first, WAIT))
    assert [[r.seed for r in call] for call in backend.calls] == [[1]]
    await servicer.close()


@pytest.mark.asyncio
async def test_the_audio_backend_is_given_the_last_deadline_of_its_batchs_callers():
    """What a backend that calls out (Triton) bounds its call by: the longest any caller of the batch waits."""
    backend = FakeCountingAudioBackend()
    batcher = Batcher(backend, max_batch_size=2, max_wait_ms=10_000)  # leaves when full
    sooner, later = Deadline.after(30), Deadline.after(60)
    await asyncio.wait_for(asyncio.gather(batcher.submit(_request(1), deadline=sooner),
                                          batcher.submit(_request(2), deadline=later)), WAIT)
    await asyncio.wait_for(asyncio.gather(batcher.submit(_request(3), deadline=sooner),
                                          batcher.submit(_request(4))), WAIT)  # one caller waits forever
    assert [[r.seed for r in call] for call in backend.calls] == [[1, 2], [3, 4]]
    assert backend.deadlines[0].at == later.at
    assert backend.deadlines[1].at is None
    await batcher.close()


def test_the_latest_of_several_deadlines():
    assert Deadline.latest([Deadline(5.0), Deadline(7.0), Deadline(6.0)]).at == 7.0
    assert Deadline.latest([Deadline(5.0), None]).at is None  # a caller without a deadline
    assert Deadline.latest([Deadline(5.0), Deadline()]).at is None
