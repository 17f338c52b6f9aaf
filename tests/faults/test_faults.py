"""Faults, each with what the client sees fixed: real services (tiny checkpoints) on loopback.

Every wait is bounded (BOUND); child processes are killed on the way out whatever happens.
"""
from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from image_to_sound.v1 import audio_pb2, audio_pb2_grpc, common_pb2, orchestrator_pb2 as pb, orchestrator_pb2_grpc
from tests.fake_services import scripted_description
from tests.real_stack import audio_process, in_flight, real_stack

BOUND = 120  # seconds: a broken fault path fails the test instead of hanging it
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
pytestmark = pytest.mark.faults


def described(sources: int = 2, steps: int = 2, seconds: float = 1.0, **options) -> pb.ImageToSoundRequest:
    """A hand-made description (no VLM in the way): the audio path is what these faults hit."""
    return pb.ImageToSoundRequest(
        description=scripted_description(sources=sources, variants=1),
        audio=common_pb2.AudioSettings(duration_seconds=seconds, num_inference_steps=steps, seed=3),
        options=pb.PipelineOptions(**options),
    )


async def until(condition, timeout: float = BOUND) -> None:
    """Waits for a condition that no event announces (a gauge in another task's finally), bounded."""
    async def poll():
        while not condition():
            await asyncio.sleep(0.02)
    await asyncio.wait_for(poll(), timeout)


async def health_becomes(channel, status, service: str = "") -> None:
    async def watch():
        async for response in health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=service)):
            if response.status == status:
                return
    await asyncio.wait_for(watch(), BOUND)


class StepWatchingBackend:
    """Wraps the real tiny diffusers backend: records denoising steps, the step at which `should_stop`
    first said stop, and raises `fail_with` from the next generate() calls (one fault per item)."""

    def __init__(self, inner):
        self.inner = inner
        self.steps = 0
        self.steps_at_stop: int | None = None
        self.first_step = threading.Event()
        self.returned = threading.Event()
        self.outcome: BaseException | None = None
        self.fail_with: list[BaseException] = []
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, requests, *, should_stop=None, on_step=None, deadline=None):
        self.calls += 1
        if self.fail_with:
            raise self.fail_with.pop(0)
        self.steps, self.steps_at_stop, self.outcome = 0, None, None
        self.returned.clear()

        def step(done, total):
            self.steps = done
            self.first_step.set()
            if on_step:
                on_step(done, total)

        def stop() -> bool:
            stopping = bool(should_stop and should_stop())
            if stopping and self.steps_at_stop is None:
                self.steps_at_stop = self.steps
            return stopping

        try:
            return self.inner.generate(requests, should_stop=stop, on_step=step)
        except BaseException as exc:
            self.outcome = exc
            raise
        finally:
            self.returned.set()


@pytest.fixture
def watched_audio(tiny_audio_dir):
    from audio_service.diffusers_backend import DiffusersAudioBackend

    return StepWatchingBackend(DiffusersAudioBackend(str(tiny_audio_dir), device="cpu"))


async def test_killed_audio_service_fails_its_clips_and_the_orchestrator_recovers(tiny_vlm_dir, tiny_audio_dir):
    audio = audio_process(tiny_audio_dir)
    try:
        await audio.serving()
        async with real_stack(tiny_vlm_dir, tiny_audio_dir, audio_target=audio.target) as stack:
            async with grpc.aio.insecure_channel(stack.target) as channel:
                stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
                requests: asyncio.Queue = asyncio.Queue()

                async def messages():
                    while (item := await requests.get()) is not None:
                        yield item

                call = stub.StreamImagesToSound(messages(), timeout=BOUND)
                events = call.__aiter__()

                async def until_summary(request_id):
                    seen = []
                    while True:
                        event = await asyncio.wait_for(events.__anext__(), BOUND)
                        assert event.WhichOneof("event") != "image_failed", event
                        if event.request_id == request_id:
                            seen.append(event)
                            if event.WhichOneof("event") == "summary":
                                return seen

                # Image 1: a long render (500 steps); the audio service is killed once it has been asked.
                request = described(sources=2, steps=500)
                request.request_id = "before"
                await requests.put(pb.StreamImagesToSoundRequest(image=request))
                while (await asyncio.wait_for(events.__anext__(), BOUND)).WhichOneof("event") != "description":
                    pass
                audio.kill()
                first = await until_summary("before")
                failed = [e.clip_failed for e in first if e.WhichOneof("event") == "clip_failed"]
                assert len(failed) == 2 and {f.code for f in failed} == {grpc.StatusCode.UNAVAILABLE.value[0]}
                assert all("127.0.0.1" not in f.message and str(audio.port) not in f.message for f in failed), failed
                await health_becomes(channel, NOT_SERVING)

                # The same stream keeps serving what needs no audio while the audio service is down.
                request = described(skip_audio=True)
                request.request_id = "meanwhile"
                await requests.put(pb.StreamImagesToSoundRequest(image=request))
                kinds = [e.WhichOneof("event") for e in await until_summary("meanwhile")]
                assert "description" in kinds and "clip_failed" not in kinds

                # Back on the same port: the orchestrator reconnects, says SERVING, renders every clip.
                port = audio.port
                audio.close()
                audio = audio_process(tiny_audio_dir, port)
                await audio.serving()
                await health_becomes(channel, SERVING)
                request = described(sources=2)
                request.request_id = "after"
                await requests.put(pb.StreamImagesToSoundRequest(image=request))
                kinds = [e.WhichOneof("event") for e in await until_summary("after")]
                assert kinds.count("clip_done") == 2 and "clip_failed" not in kinds
                await requests.put(None)
                assert [e async for e in events] == []
    finally:
        audio.close()


async def test_client_going_away_stops_the_denoising_loop_within_one_step(tiny_vlm_dir, tiny_audio_dir, watched_audio):
    async with real_stack(tiny_vlm_dir, tiny_audio_dir, audio_backend=watched_audio) as stack:
        async with grpc.aio.insecure_channel(stack.target) as channel:
            call = orchestrator_pb2_grpc.OrchestratorStub(channel).ImageToSound(described(sources=1, steps=500),
                                                                                timeout=BOUND)
            watched_audio.first_step.clear()
            reader = asyncio.ensure_future(call.read())  # the scene event; then the call waits on the clip
            assert await asyncio.to_thread(watched_audio.first_step.wait, BOUND)
            call.cancel()  # the client goes away while the model is denoising
            await asyncio.gather(reader, return_exceptions=True)
            assert await asyncio.to_thread(watched_audio.returned.wait, BOUND)
        from audio_service.backend import BackendCancelled

        assert isinstance(watched_audio.outcome, BackendCancelled)
        assert watched_audio.steps < 500
        assert watched_audio.steps - watched_audio.steps_at_stop <= 1  # the loop ended at the next step boundary
        await until(lambda: in_flight("GenerateAudio") == 0 and in_flight("ImageToSound") == 0)


async def test_deadline_reaches_the_caller_and_leaves_no_work_behind(tiny_vlm_dir, tiny_audio_dir, watched_audio):
    async with real_stack(tiny_vlm_dir, tiny_audio_dir, audio_backend=watched_audio) as stack:
        async with grpc.aio.insecure_channel(stack.target) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
            watched_audio.first_step.clear()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in stub.ImageToSound(described(sources=1, steps=500), timeout=3):
                    pass
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert await asyncio.to_thread(watched_audio.returned.wait, BOUND)
            await until(lambda: all(in_flight(m) == 0 for m in ("GenerateAudio", "StreamSceneDescription", "ImageToSound")))
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == SERVING


async def test_out_of_memory_is_resource_exhausted_and_the_service_stays_serving(tiny_vlm_dir, tiny_audio_dir,
                                                                                watched_audio):
    import torch

    async with real_stack(tiny_vlm_dir, tiny_audio_dir, audio_backend=watched_audio) as stack:
        async with grpc.aio.insecure_channel(stack.audio_target) as channel:
            stub = audio_pb2_grpc.AudioServiceStub(channel)
            watched_audio.fail_with = [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")]
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in stub.GenerateAudio(audio_pb2.GenerateAudioRequest(
                        prompt="rain on a tin roof", settings=common_pb2.AudioSettings(duration_seconds=1, num_inference_steps=2)),
                        timeout=BOUND):
                    pass
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "out of memory" in info.value.details() and "GiB" not in info.value.details()
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == SERVING
        # Through the orchestrator, a clip refused for memory before any chunk is retried, not duplicated.
        async with grpc.aio.insecure_channel(stack.target) as channel:
            watched_audio.fail_with = [MemoryError()]
            calls = watched_audio.calls
            events = [e async for e in orchestrator_pb2_grpc.OrchestratorStub(channel).ImageToSound(
                described(sources=1), timeout=BOUND)]
            kinds = [e.WhichOneof("event") for e in events]
            assert kinds.count("clip_done") == 1 and "clip_failed" not in kinds
            chunks = [e.audio.chunk for e in events if e.WhichOneof("event") == "audio"]
            assert [c.sequence_number for c in chunks] == list(range(len(chunks))) and chunks[-1].last
            assert watched_audio.calls == calls + 2


async def test_sigterm_flips_health_refuses_new_calls_finishes_in_flight_and_exits_0(tiny_audio_dir):
    # No drain notice: new calls are refused as soon as health says NOT_SERVING (the notice, which keeps
    # accepting them a moment for clients still on their way, is what tests/faults/test_replicas.py covers).
    audio = audio_process(tiny_audio_dir, 0, "--grace-seconds", "100", "--drain-notice-seconds", "0")
    try:
        await audio.serving()
        async with grpc.aio.insecure_channel(audio.target) as channel:
            stub = audio_pb2_grpc.AudioServiceStub(channel)
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            statuses = watch.__aiter__()
            assert (await asyncio.wait_for(statuses.__anext__(), BOUND)).status == SERVING
            request = audio_pb2.GenerateAudioRequest(
                prompt="rain on a tin roof", clip_id="in-flight",
                settings=common_pb2.AudioSettings(duration_seconds=1, num_inference_steps=40))
            in_flight_call = stub.GenerateAudio(request, timeout=BOUND)
            responses = in_flight_call.__aiter__()
            first = await asyncio.wait_for(responses.__anext__(), BOUND)
            assert first.WhichOneof("event") == "progress"
            exit_code = asyncio.ensure_future(audio.terminate(timeout=BOUND))
            assert (await asyncio.wait_for(statuses.__anext__(), BOUND)).status == NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in stub.GenerateAudio(request, timeout=BOUND):
                    pass
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            rest = [r async for r in responses]
            chunks = [r.chunk for r in rest if r.WhichOneof("event") == "chunk"]
            assert chunks and chunks[-1].last and chunks[-1].metadata.num_samples == 16000
            assert await exit_code == 0
    finally:
        audio.close()
