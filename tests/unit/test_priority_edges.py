"""Where a priority comes from: the request field, the `I2S-Priority` HTTP header (or gRPC metadata), the
Python client's argument, the command line (batch for a folder, interactive for --single); how a bad one is
refused; and that the orchestrator sends the resolved priority and cache flag to both model services.
Orchestration only: FAKE model services behind the real orchestrator and HTTP front."""
from __future__ import annotations

import grpc
import httpx
import pytest
from google.protobuf import json_format

from i2s_cli.cli import build_parser, settings_from
from i2s_client.client import make_request
from i2s_formats import contract
from image_to_sound.v1 import audio_pb2, common_pb2, orchestrator_pb2 as pb, orchestrator_pb2_grpc, vision_pb2
from serving.errors import InvalidInput
from serving.server import ServerOptions
from tests.fake_services import FakeAudioServicer, FakeVisionServicer, fake_stack
from tests.bad_inputs import _save

WAIT = 60


def test_the_field_wins_then_the_header_then_interactive():
    assert contract.handling(common_pb2.PRIORITY_BATCH, header="interactive").priority == "batch"
    assert contract.handling(common_pb2.PRIORITY_UNSPECIFIED, header=" Batch ").priority == "batch"
    assert contract.handling(common_pb2.PRIORITY_UNSPECIFIED).priority == "interactive"
    assert contract.handling(common_pb2.PRIORITY_INTERACTIVE, bypass_cache=True) == \
        contract.Handling("interactive", True)


def test_an_unknown_priority_is_refused_with_one_message_at_every_edge():
    with pytest.raises(InvalidInput, match="^i2s-priority header 'urgent' is not one of interactive, batch$"):
        contract.handling(0, header="urgent")
    with pytest.raises(InvalidInput, match="^priority=7 is not a known priority"):
        contract.scene_request(vision_pb2.StreamSceneDescriptionRequest(
            image=common_pb2.Image(data=_save()), priority=7))
    with pytest.raises(InvalidInput, match="^priority=9 is not a known priority"):
        contract.generate_audio("rain", common_pb2.AudioSettings(), request=audio_pb2.GenerateAudioRequest(priority=9))


def test_the_client_argument_sets_the_field_and_refuses_nonsense():
    request = make_request(b"image", priority="batch", bypass_cache=True)
    assert request.options.priority == common_pb2.PRIORITY_BATCH and request.options.bypass_cache
    assert make_request(b"image").options.priority == common_pb2.PRIORITY_UNSPECIFIED  # the server's default
    with pytest.raises(ValueError, match="priority='soon': use one of interactive, batch"):
        make_request(b"image", priority="soon")


def test_the_command_line_sends_batch_for_a_folder_and_interactive_for_one_image():
    folder = settings_from(build_parser().parse_args([]))
    single = settings_from(build_parser().parse_args(["--single", "data/coffee.png", "--bypass_cache"]))
    assert folder.options.priority == common_pb2.PRIORITY_BATCH and not folder.options.bypass_cache
    assert single.options.priority == common_pb2.PRIORITY_INTERACTIVE and single.options.bypass_cache


def image_request(**options) -> pb.ImageToSoundRequest:
    return pb.ImageToSoundRequest(request_id="p", image=common_pb2.Image(data=_save(), mime_type="image/png"),
                                  audio=common_pb2.AudioSettings(duration_seconds=1),
                                  options=pb.PipelineOptions(max_clips=1, **options))


async def test_the_grpc_metadata_header_reaches_both_model_services_with_the_cache_flag():
    async with fake_stack(FakeVisionServicer(), FakeAudioServicer()) as (target, vision, audio):
        async with grpc.aio.insecure_channel(target) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
            events = [e async for e in stub.ImageToSound(image_request(bypass_cache=True), timeout=WAIT,
                                                          metadata=(("i2s-priority", "batch"),))]
            assert events[-1].HasField("summary")
            sent = [*vision.requests, *audio.requests]
            assert len(sent) == 2 and all(r.priority == common_pb2.PRIORITY_BATCH and r.bypass_cache for r in sent)

            with pytest.raises(grpc.aio.AioRpcError) as refused:
                [e async for e in stub.ImageToSound(image_request(), timeout=WAIT, metadata=(("i2s-priority", "now"),))]
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert refused.value.details() == "i2s-priority header 'now' is not one of interactive, batch"
            assert len(vision.requests) == 1  # refused before any work


async def test_the_http_header_sets_the_priority_of_a_json_lines_call():
    from gateway.front import HttpFront
    from gateway.options import HttpOptions

    async with fake_stack(FakeVisionServicer(), FakeAudioServicer()) as (target, vision, audio):
        http = HttpFront(HttpOptions(http_port=0), ServerOptions(port=0), target)
        await http.start()
        try:
            async with httpx.AsyncClient(timeout=WAIT) as client:
                body = json_format.MessageToJson(image_request())
                response = await client.post(f"http://127.0.0.1:{http.port}/v1/image-to-sound", content=body,
                                             headers={"content-type": "application/json", "I2S-Priority": "batch"})
                assert response.status_code == 200
                refused = await client.post(f"http://127.0.0.1:{http.port}/v1/image-to-sound", content=body,
                                            headers={"content-type": "application/json", "I2S-Priority": "later"})
        finally:
            await http.stop()
        assert [r.priority for r in vision.requests] == [common_pb2.PRIORITY_BATCH]
        assert refused.status_code == 400 and "i2s-priority header 'later'" in refused.text
