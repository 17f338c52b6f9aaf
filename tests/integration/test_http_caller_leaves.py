"""A caller of the HTTP front who leaves before the first event stops the work: the orchestrator's gRPC call
is cancelled at once, the model services see their call cancelled, and nothing is rendered for nobody.

The model services are the fakes of tests/fake_services.py (orchestration only, as their names say): the
vision service holds its stream before its first event, as a VLM still reading the image does. The
orchestrator and the HTTP front are the real ones, on loopback."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from google.protobuf import json_format

from image_to_sound.v1 import orchestrator_pb2 as pb
from serving.server import ServerOptions
from tests.fake_services import FakeAudioServicer, FakeVisionServicer, fake_stack
from tests.real_stack import png

BOUND = 30  # seconds: every wait of this test


def _request() -> pb.ImageToSoundRequest:
    request = pb.ImageToSoundRequest(request_id="leaves")
    request.image.data, request.image.mime_type = png(), "image/png"
    return request


async def _json_lines(base: str) -> list[str]:
    """The kinds of the events of one image over JSON lines."""
    body = json_format.MessageToJson(_request())
    async with httpx.AsyncClient(timeout=BOUND) as client:
        async with client.stream("POST", f"{base}/v1/image-to-sound", content=body,
                                 headers={"content-type": "application/json"}) as response:
            assert response.status_code == 200, await response.aread()
            return [json_format.ParseDict(json.loads(line), pb.ImageToSoundEvent()).WhichOneof("event")
                    async for line in response.aiter_lines() if line]


async def _connect(base: str) -> list[str]:
    """The same over Connect."""
    from image_to_sound.v1.orchestrator_connect import OrchestratorClient

    async with OrchestratorClient(base) as client:
        return [event.WhichOneof("event") async for event in client.image_to_sound(_request(), timeout_ms=BOUND * 1000)]


@pytest.mark.parametrize("route", [_json_lines, _connect], ids=["json_lines", "connect"])
async def test_a_caller_who_leaves_before_the_first_event_leaves_no_work_running(route):
    from gateway.front import HttpFront
    from gateway.options import HttpOptions

    vision, audio = FakeVisionServicer(hold_before_scene=True), FakeAudioServicer()
    async with fake_stack(vision, audio) as (target, _, _):
        front = HttpFront(HttpOptions(http_port=0), ServerOptions(host="127.0.0.1", port=0), target)
        await front.start()
        base = f"http://127.0.0.1:{front.port}"
        try:
            caller = asyncio.create_task(route(base))
            await asyncio.wait_for(vision.entered.wait(), BOUND)  # accepted, forwarded, describing: no event yet
            caller.cancel()  # the caller leaves: its connection closes
            await asyncio.gather(caller, return_exceptions=True)
            # The orchestrator cancelled its call: the vision service sees it cancelled, nothing was rendered.
            await asyncio.wait_for(vision.was_cancelled.wait(), BOUND)
            assert not vision.finished and audio.prompts == []

            # The next caller stays: the same stack describes and renders its image, and only its image.
            vision.release.set()
            kinds = await asyncio.wait_for(route(base), BOUND)
            assert kinds.count("clip_done") == len(audio.prompts) == 6 and vision.calls == 2
        finally:
            await front.stop()
