"""A caller that leaves frees the models (tiny real checkpoints, the whole stack in process): the VLM row of
its image is released at the next decode step, and the image's clips still queued in the audio batcher are
dropped without being rendered; i2s_work_cancelled_total counts both."""
from __future__ import annotations

import asyncio
import contextlib
import threading

import grpc
import pytest
from prometheus_client import REGISTRY

from image_to_sound.v1 import common_pb2, orchestrator_pb2 as pb, orchestrator_pb2_grpc
from tests.faults.test_faults import BOUND, StepWatchingBackend, described, until
from tests.real_stack import png, real_stack
from vlm_service.messages import Finished

pytestmark = pytest.mark.faults


def cancelled(stage: str, state: str) -> float:
    return REGISTRY.get_sample_value("i2s_work_cancelled_total", {"stage": stage, "state": state}) or 0.0


class HeldAudioBackend(StepWatchingBackend):
    """The real tiny diffusers backend, whose denoising waits at its first step until `release` is set: other
    requests queue in the batcher meanwhile."""

    def __init__(self, inner):
        super().__init__(inner)
        self.release = threading.Event()

    def generate(self, requests, *, should_stop=None, on_step=None, **kwargs):
        def held(done, total):
            if done == 1:
                assert self.release.wait(BOUND)
            if on_step:
                on_step(done, total)

        return super().generate(requests, should_stop=should_stop, on_step=held, **kwargs)


@pytest.fixture
def held_audio(tiny_audio_dir):
    from audio_service.diffusers_backend import DiffusersAudioBackend

    return HeldAudioBackend(DiffusersAudioBackend(str(tiny_audio_dir), device="cpu"))


async def test_the_queued_clips_of_an_image_whose_caller_left_are_never_rendered(tiny_vlm_dir, tiny_audio_dir,
                                                                                  held_audio):
    async with real_stack(tiny_vlm_dir, tiny_audio_dir, audio_backend=held_audio) as stack:
        batcher = stack.audio_servicer.batcher
        async with grpc.aio.insecure_channel(stack.target) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
            other = stub.ImageToSound(described(sources=1), timeout=BOUND)  # another caller's clip holds the model
            other_events = asyncio.ensure_future(_drain(other))
            assert await asyncio.to_thread(held_audio.first_step.wait, BOUND)
            calls, queued_before = held_audio.calls, cancelled("audio", "queued")

            leaving = stub.ImageToSound(described(sources=4, seconds=2.0), timeout=BOUND)  # 4 clips: all queue
            await until(lambda: batcher.queue_depth == 4)
            leaving.cancel()  # the caller goes away while its clips wait
            await until(lambda: batcher.queue_depth == 0)
            held_audio.release.set()
            kinds = [e.WhichOneof("event") for e in await other_events]
            assert kinds.count("clip_done") == 1  # the other caller's clip finished as usual
        assert held_audio.calls == calls  # no clip of the image that was left reached the model
        assert cancelled("audio", "queued") - queued_before == 4


async def _drain(call) -> list:
    return [event async for event in call]


class StepCountingEngine:
    """Counts the real engine's steps (plans run) and, from the third step, waits until the watched request is cancelled
    (so its caller's cancel lands while the row decodes, whatever the tiny model generates)."""

    def __init__(self, engine):
        self.engine, self.steps = engine, 0
        self.paused, self.cancel_seen = threading.Event(), threading.Event()
        self.original = engine.run

    def run(self, plan):
        self.steps += 1
        if self.steps == 3:
            self.paused.set()
            assert self.cancel_seen.wait(BOUND)
        return self.original(plan)


class WatchedCancel(threading.Event):
    """A request's cancel flag that notes the engine step at which it was set."""

    def __init__(self, counter: StepCountingEngine):
        super().__init__()
        self.counter, self.at_step = counter, None

    def set(self):
        if self.at_step is None:
            self.at_step = self.counter.steps
            self.counter.cancel_seen.set()
        super().set()


@contextlib.asynccontextmanager
async def engine_stack(tiny_vlm_dir):
    """The VLM service with its decode engine (as deployed: --engine) and the orchestrator, no audio service."""
    from orchestrator.config import OrchestratorConfig
    from orchestrator.server import Orchestrator
    from serving.server import ServerOptions
    from vlm_service.config import VlmConfig
    from vlm_service.server import engine_options, load_and_warm, make_server
    from vlm_service.transformers_backend import TransformersVisionBackend

    options = ServerOptions(port=0, grace_seconds=1)
    config = VlmConfig(model=str(tiny_vlm_dir), server=options)
    backend = TransformersVisionBackend(str(tiny_vlm_dir), device="cpu", max_pixels=64 * 28 * 28,
                                        engine=engine_options(config))
    vlm, servicer = make_server(config, backend)
    await vlm.start()
    await asyncio.to_thread(load_and_warm, backend)
    await vlm.set_serving(True)
    orchestrator = Orchestrator(OrchestratorConfig(vlm_target=vlm.address, audio_target="", server=options))
    await orchestrator.server.start()
    try:
        await orchestrator.wait_for_backends(timeout=BOUND)
        await orchestrator.server.set_serving(True)
        yield orchestrator.server.address, backend
    finally:
        await orchestrator.server.stop()
        await orchestrator.close()
        await vlm.stop()
        servicer.close()
        backend.close()


async def test_a_caller_leaving_frees_its_vlm_row_at_the_next_step(tiny_vlm_dir):
    async with engine_stack(tiny_vlm_dir) as (target, backend):
        engine, scheduler = backend.engine, backend.scheduler
        counter = StepCountingEngine(engine)
        engine.run = counter.run
        watched, flags, ended = [], [], threading.Event()
        submit = scheduler.submit

        def watching_submit(req):
            req.cancelled = WatchedCancel(counter)
            flags.append(req.cancelled)
            deliver = req.deliver

            def noting(item):
                if isinstance(item, Finished):
                    watched.append((item.reason, counter.steps))
                    ended.set()
                deliver(item)

            req.deliver = noting
            submit(req)

        scheduler.submit = watching_submit
        running_before = cancelled("vlm", "running")
        try:
            request = pb.ImageToSoundRequest(image=common_pb2.Image(data=png(), mime_type="image/png"),
                                             decoding=common_pb2.DecodingSettings(max_new_tokens=2048),
                                             options=pb.PipelineOptions(skip_audio=True))
            async with grpc.aio.insecure_channel(target) as channel:
                call = orchestrator_pb2_grpc.OrchestratorStub(channel).ImageToSound(request, timeout=BOUND)
                assert await asyncio.to_thread(counter.paused.wait, BOUND)  # the row is decoding
                call.cancel()
                assert await asyncio.to_thread(ended.wait, BOUND)
        finally:
            del engine.run, scheduler.submit
        (reason, finished_at), = watched
        (flag,) = flags
        assert reason == "cancelled" and flag.at_step == 3  # set while the third step waited
        assert finished_at - flag.at_step <= 1  # released at the next step boundary
        assert engine.active == 0
        assert cancelled("vlm", "running") - running_before == 1
