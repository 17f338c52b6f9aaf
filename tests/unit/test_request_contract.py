"""The request contract (i2s_formats.contract): every row of the bad-input catalogue (tests/bad_inputs.py) sent
to every public servicer that takes its field, in process, with fake backends and fake downstream stubs that
record any call. Each refusal happens at the first edge, raised from the contract module, with the message the
contract gives, whichever service receives it; nothing reaches a backend or a downstream service."""
from __future__ import annotations

import traceback
from dataclasses import dataclass, field

import grpc
import pytest

from audio_service.config import AudioConfig
from audio_service.server import AudioServicer
from i2s_formats import contract
from image_to_sound.v1 import audio_pb2, common_pb2, orchestrator_pb2 as pb, vision_pb2
from orchestrator.config import OrchestratorConfig
from orchestrator.pipeline import Pipeline
from orchestrator.server import OrchestratorServicer
from serving.errors import InvalidInput
from serving.images import check_image
from tests.bad_inputs import CATALOGUE, INVALID, Case, set_field
from tests.real_stack import png
from vlm_service.config import VlmConfig
from vlm_service.server import VisionServicer

ROWS = [case for case in CATALOGUE if case.code == INVALID]
GOOD_AUDIO = common_pb2.AudioSettings(duration_seconds=1, num_inference_steps=2, seed=1)
CAPTION = "rain on a tin roof"


@dataclass
class FakeCalls:
    """Stands for every backend and downstream stub: any call is recorded (and must not happen)."""

    calls: list[str] = field(default_factory=list)
    ready: bool = True
    model_id: str = "fake"
    sample_rate_hertz: int = 16000
    queue_depth: int = 0  # read by the queue-depth gauge
    concurrent_requests: int | None = 1  # a backend that takes one request at a time (a worker in front)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def record(*args, **kwargs):
            self.calls.append(name)
            raise AssertionError(f"{name} called for a request the contract should have refused")
        return record


class FakeContext:
    def time_remaining(self):
        return None

    def set_trailing_metadata(self, metadata):
        pass

    def invocation_metadata(self):
        return ()


@pytest.fixture
def services():
    fake = FakeCalls()
    vision = VisionServicer(fake, VlmConfig())
    audio = AudioServicer(fake, AudioConfig())
    orchestrator = OrchestratorServicer(Pipeline(fake, fake), OrchestratorConfig())
    yield fake, vision, audio, orchestrator
    vision.close()


def contract_message(case: Case, value) -> str:
    """What the contract module itself says about the bad field."""
    with pytest.raises(InvalidInput) as refused:
        if case.field == "image":
            contract.scene_request(vision_pb2.DescribeSceneRequest(image=common_pb2.Image(data=value[0], mime_type=value[1])))
        elif case.field == "decoding":
            contract.decoding_options(value)
        elif case.field == "audio":
            contract.generate_audio(CAPTION, value)
        elif case.field == "prompt":
            contract.generate_audio(value, GOOD_AUDIO)
        else:
            contract.image_to_sound(orchestrator_request(case, value), OrchestratorConfig().limits.max_clips_per_image)
    return str(refused.value)


def orchestrator_request(case: Case, value) -> pb.ImageToSoundRequest:
    request = pb.ImageToSoundRequest(request_id="contract", audio=GOOD_AUDIO)
    request.image.data = png()
    return set_field(request, case, value)


def stream_config(case: Case, value) -> pb.StreamConfig | None:
    """The same bad field in a stream's config instead of the image (settings only)."""
    if case.field == "decoding":
        return pb.StreamConfig(decoding=value)
    if case.field == "audio":
        return pb.StreamConfig(audio=value)
    if case.field == "options":
        return pb.StreamConfig(options=pb.PipelineOptions(**value))
    return None


async def refusal(call) -> str:
    """Runs one servicer call (a coroutine or an async generator); the message of its InvalidInput."""
    with pytest.raises(InvalidInput) as refused:
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await call
    frames = [frame.filename for frame in traceback.extract_tb(refused.value.__traceback__)]
    assert any(name.endswith("i2s_formats/contract.py") for name in frames), frames  # refused by the contract
    return str(refused.value)


async def stream_failure(orchestrator, messages) -> pb.ImageFailed:
    async def requests_in():
        for message in messages:
            yield message

    events = [event async for event in orchestrator.StreamImagesToSound(requests_in(), FakeContext())]
    assert [event.WhichOneof("event") for event in events] == ["image_failed"], events
    return events[0].image_failed


# Rows the orchestrator cannot see from an image's header: only decoding the pixels finds them (the VLM does).
NEEDS_DECODING = {"truncated PNG"}


@pytest.mark.asyncio
@pytest.mark.parametrize("case", ROWS, ids=[case.name for case in ROWS])
async def test_a_bad_field_is_refused_at_the_first_edge_with_the_contract_message(case, services):
    fake, vision, audio, orchestrator = services
    value = case.make()
    expected = contract_message(case, value)
    assert case.fragment in expected
    messages = []

    if case.field in ("image", "decoding"):
        image = common_pb2.Image(data=png())
        decoding = common_pb2.DecodingSettings()
        if case.field == "image":
            image = common_pb2.Image(data=value[0], mime_type=value[1])
        else:
            decoding = value
        messages.append(await refusal(vision.DescribeScene(
            vision_pb2.DescribeSceneRequest(image=image, decoding=decoding), FakeContext())))
        messages.append(await refusal(vision.StreamSceneDescription(
            vision_pb2.StreamSceneDescriptionRequest(image=image, decoding=decoding), FakeContext())))
    if case.field in ("audio", "prompt"):
        prompt, settings = (CAPTION, value) if case.field == "audio" else (value, GOOD_AUDIO)
        messages.append(await refusal(audio.GenerateAudio(
            audio_pb2.GenerateAudioRequest(prompt=prompt, settings=settings), FakeContext())))
    if case.field in ("image", "decoding", "audio", "options", "description") and case.name not in NEEDS_DECODING:
        request = orchestrator_request(case, value)
        messages.append(await refusal(orchestrator.ImageToSound(request, FakeContext())))
        failed = await stream_failure(orchestrator, [pb.StreamImagesToSoundRequest(image=request)])
        assert failed.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        messages.append(failed.message)
        config = stream_config(case, value)
        if config is not None:  # the bad field in the stream's config, inherited by a good image
            good = pb.ImageToSoundRequest(request_id="contract")
            good.image.data = png()
            failed = await stream_failure(orchestrator, [pb.StreamImagesToSoundRequest(config=config),
                                                         pb.StreamImagesToSoundRequest(image=good)])
            messages.append(failed.message)

    assert messages and set(messages) == {expected}, messages
    assert fake.calls == []  # no backend, no downstream service was reached


def test_only_a_truncated_image_passes_the_orchestrators_header_check():
    """What the orchestrator leaves to the VLM (decoding every pixel at the orchestrator would double the work)."""
    passed = set()
    for case in ROWS:
        if case.field == "image":
            data, mime_type = case.make()
            try:
                check_image(data, mime_type)
            except InvalidInput:
                continue
            passed.add(case.name)
    assert passed == NEEDS_DECODING


def test_defaults_are_filled_in_once_by_the_contract():
    call = contract.generate_audio(CAPTION, common_pb2.AudioSettings(scheduler=common_pb2.SCHEDULER_DDIM))
    assert (call.generation.duration_seconds, call.generation.guidance_scale) == (4.0, 3.5)
    assert call.generation.num_inference_steps == 200 and call.generation.scheduler == "ddim"
    assert call.output == contract.AudioOutput(contract.ENCODINGS[0], 0.5)
    assert contract.decoding_options(common_pb2.DecodingSettings()) == contract.DecodingOptions(1024, 0.0, 1.0, None)


def test_locate_sources_survives_resolving_and_sending_on():
    """The orchestrator resolves DecodingSettings once and sends DecodingOptions.to_proto(): the VLM must
    still see locate_sources (without it, the description it makes has no boxes)."""
    from i2s_formats import contract

    for locate in (False, True):
        options = contract.decoding_options(common_pb2.DecodingSettings(locate_sources=locate, seed=3))
        assert options.locate_sources is locate
        assert contract.decoding_options(options.to_proto()) == options
