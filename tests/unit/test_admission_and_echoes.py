"""Admission (fair, bounded waits), bounded echoes of client strings, and clip-id uniqueness: orchestration
logic, on the real orchestrator with fake model services where a server is needed."""
import asyncio
import logging

import grpc
import pytest

from image_to_sound.v1 import orchestrator_pb2 as pb, orchestrator_pb2_grpc
from orchestrator.admission import Admission, StreamShare
from orchestrator.pipeline import downstream_message
from i2s_formats.contract import clean_request_id
from serving.errors import MemoryExhausted, Overloaded, excerpt, status_for
from tests.fake_services import FakeAudioServicer, fake_stack, scripted_description

BOUND = 60


async def test_a_freed_slot_goes_to_the_stream_with_fewest_images_in_work():
    admission = Admission(total=2, max_waiting=10, wait_seconds=BOUND)
    busy, quiet = StreamShare(), StreamShare()
    order = []
    held = [admission.slot(busy), admission.slot(busy)]
    for slot in held:
        await slot.__aenter__()

    async def take(share, name):
        async with admission.slot(share):
            order.append(name)

    waiters = [asyncio.ensure_future(take(busy, "busy-3")), asyncio.ensure_future(take(quiet, "quiet-1"))]
    await asyncio.sleep(0)  # let both queue (they arrive busy first)
    assert admission.waiting == 2
    await held[0].__aexit__(None, None, None)
    await asyncio.wait_for(asyncio.gather(*waiters), BOUND)
    assert order[0] == "quiet-1"  # the quiet stream was served before the busy stream's third image
    await held[1].__aexit__(None, None, None)
    assert admission.running == 0 and busy.running == 0 and quiet.running == 0


async def test_waiting_is_bounded_in_count_and_time_and_a_cancelled_waiter_leaves_no_slot_behind():
    admission = Admission(total=1, max_waiting=1, wait_seconds=0.05)
    share = StreamShare()
    async with admission.slot(share):
        with pytest.raises(Overloaded, match="no image slot within 0.05 s"):
            async with admission.slot(StreamShare()):
                pass
        waiter = asyncio.ensure_future(admission.slot(StreamShare()).__aenter__())
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="1 waiting"):  # the one waiting place is taken
            async with admission.slot(StreamShare()):
                pass
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
    assert admission.running == 0 and admission.waiting == 0


def test_echoes_of_client_strings_are_short_and_escaped():
    assert excerpt("a" * 100_000).endswith("... (100000 characters)") and len(excerpt("a" * 100_000)) < 100
    assert "\n" not in excerpt("x\ny") and "\x00" not in excerpt("x\x00y")
    assert clean_request_id("img\x00\nforged") == "img forged"
    assert len(clean_request_id("r" * 10_000)) == 128
    assert clean_request_id("\x00\x01")  # nothing printable left: a fresh id


def test_downstream_transport_details_do_not_reach_the_client():
    message = downstream_message("audio service", grpc.StatusCode.UNAVAILABLE,
                                 "failed to connect to all addresses; last error: ipv4:10.0.3.7:50052: Connection refused")
    assert "10.0.3.7" not in message and "50052" not in message
    kept = downstream_message("audio service", grpc.StatusCode.INVALID_ARGUMENT, "settings: duration at 10.0.3.7:50052")
    assert "duration" in kept and "10.0.3.7" not in kept


def test_out_of_memory_maps_to_resource_exhausted_without_importing_torch():
    class OutOfMemoryError(RuntimeError):  # the shape of torch.cuda.OutOfMemoryError, matched by name
        pass

    for exc in (OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), MemoryError(), MemoryExhausted()):
        code, message = status_for(exc)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "GiB" not in message


async def test_two_images_with_one_request_id_in_a_stream_get_distinct_clip_ids(caplog):
    request = pb.ImageToSoundRequest(request_id="same\nid", description=scripted_description(sources=1, variants=2))
    request.audio.duration_seconds = 1
    async with fake_stack(audio=FakeAudioServicer(fail_word="source")) as (target, _, _):
        async with grpc.aio.insecure_channel(target) as channel:
            with caplog.at_level(logging.INFO):
                events = await asyncio.wait_for(_collect(orchestrator_pb2_grpc.OrchestratorStub(channel).StreamImagesToSound(
                    iter([pb.StreamImagesToSoundRequest(image=request)] * 2))), BOUND)
    failed = [e.clip_failed for e in events if e.WhichOneof("event") == "clip_failed"]
    assert len(failed) == 4 and len({f.clip.clip_id for f in failed}) == 4
    assert {e.request_id for e in events} == {"same id"}
    assert not any("\n" in record.getMessage() for record in caplog.records)


async def _collect(call):
    return [e async for e in call]
