"""The orchestrator's spans say what failed: an image that fails and a clip reported as ClipFailed are
error spans with the status the caller was told; images and clips that went well are not. Fake model
services (orchestration only, as their names say) behind the real orchestrator, tracing into memory."""
from __future__ import annotations

import grpc
import pytest

from image_to_sound.v1 import orchestrator_pb2 as pb, orchestrator_pb2_grpc
from serving import tracing
from tests.fake_services import FakeAudioServicer, fake_stack
from tests.real_stack import png

BOUND = 30


def _request(request_id: str, data: bytes) -> pb.ImageToSoundRequest:
    request = pb.ImageToSoundRequest(request_id=request_id)
    request.image.data, request.image.mime_type = data, "image/png"
    return request


def _attributes(span) -> dict:
    return dict(span.attributes)


async def test_a_failed_image_and_a_failed_clip_are_error_spans_with_their_status(spans):
    from opentelemetry.trace import StatusCode

    async with fake_stack(audio=FakeAudioServicer(fail_word="source 2")) as (target, _, _):
        async with grpc.aio.insecure_channel(target) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
            events = [e async for e in stub.ImageToSound(_request("clips", png()), timeout=BOUND)]
            # Its header passes the orchestrator's checks; the vision service cannot decode the rest.
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                async for _ in stub.ImageToSound(_request("broken", png()[:60]), timeout=BOUND):
                    pass
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    clip_failed = {e.clip_failed.clip.clip_id: e.clip_failed for e in events if e.WhichOneof("event") == "clip_failed"}
    assert len(clip_failed) == 2  # source 2's two variants

    finished = [s for s in spans.get_finished_spans() if s.name.startswith("orchestrator.")]
    images = {_attributes(s)[tracing.REQUEST_ID]: s for s in finished if s.name == "orchestrator.image"}
    broken = images["broken"]
    assert broken.status.status_code == StatusCode.ERROR
    assert broken.status.description == f"INVALID_ARGUMENT: {failed.value.details()}"
    assert _attributes(broken)[tracing.STATUS_CODE] == "INVALID_ARGUMENT"
    assert not broken.events  # no traceback recorded: the log has it, a span carries no internals
    assert images["clips"].status.status_code == StatusCode.UNSET  # two clips failed, the image did not

    clips = {_attributes(s)["i2s.clip_id"]: s for s in finished if s.name == "orchestrator.clip"}
    assert len(clips) == 6
    for clip_id, span in clips.items():
        if clip_id in clip_failed:
            assert span.status.status_code == StatusCode.ERROR
            assert span.status.description == f"INVALID_ARGUMENT: {clip_failed[clip_id].message}"
            assert _attributes(span)[tracing.STATUS_CODE] == "INVALID_ARGUMENT"
        else:
            assert span.status.status_code == StatusCode.UNSET and tracing.STATUS_CODE not in _attributes(span)
