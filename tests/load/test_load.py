"""Load on the real services (tiny checkpoints, three processes on loopback): many streaming clients at
once, nothing lost or duplicated; overload beyond the limits answered RESOURCE_EXHAUSTED, never a hang.

Kept small for CPU (CLIENTS x IMAGES, 1 s clips, 2 denoising steps); every wait is bounded.
"""
from __future__ import annotations

import asyncio
import hashlib
from collections import defaultdict
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile as sf

from image_to_sound.v1 import common_pb2, orchestrator_pb2 as pb, orchestrator_pb2_grpc
from i2s_formats import audio_encoding
from tests.fake_services import scripted_description
from tests.real_stack import ServiceProcess, audio_process, png

CLIENTS, IMAGES = 32, 3
BOUND = 900  # seconds for the whole load; a hang fails instead of blocking the suite
pytestmark = pytest.mark.load


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@pytest.fixture(scope="module")
async def services(tiny_vlm_dir, tiny_audio_dir):
    vlm = ServiceProcess("vlm_service", ["--model", str(tiny_vlm_dir), "--device", "cpu", "--max-pixels", str(64 * 28 * 28)])
    audio = audio_process(tiny_audio_dir)
    orchestrator = None
    try:
        await asyncio.gather(vlm.serving(), audio.serving())
        # CPU: an image may wait minutes for its slot; the default bound (60 s) is for GPU latencies.
        orchestrator = ServiceProcess("orchestrator", ["--vlm", vlm.target, "--audio", audio.target,
                                                      "--admission-wait-seconds", str(BOUND)])
        await orchestrator.serving()
        yield {"vlm": vlm, "audio": audio, "orchestrator": orchestrator}
        for name, process in (("vlm", vlm), ("audio", audio), ("orchestrator", orchestrator)):
            print(f"peak RSS {name}: {peak_rss_mib(process.process.pid):.0f} MiB")
        assert await orchestrator.terminate() == 0
    finally:
        for process in (orchestrator, audio, vlm):
            if process is not None:
                process.close()


async def one_client(stub, client: int) -> list[pb.ImageToSoundEvent]:
    config = pb.StreamConfig(audio=common_pb2.AudioSettings(duration_seconds=1, num_inference_steps=2, seed=client),
                             decoding=common_pb2.DecodingSettings(max_new_tokens=48))
    messages = [pb.StreamImagesToSoundRequest(config=config)]
    for image in range(IMAGES):
        request = pb.ImageToSoundRequest(request_id=f"c{client}-i{image}")
        if image == 0:  # one photo per client through the VLM (a random tiny model: few or no clips)
            request.image.data = png(color=(client * 7 % 255, image * 60, 90))
        else:  # the others from descriptions, so that every client certainly gets clips to check
            request.description.CopyFrom(scripted_description(sources=2, variants=1))
        messages.append(pb.StreamImagesToSoundRequest(image=request))
    return [e async for e in stub.StreamImagesToSound(iter(messages), timeout=BOUND)]


@pytest.mark.timeout(BOUND + 60)
async def test_32_streaming_clients_lose_and_duplicate_nothing(services, tmp_path):
    async with grpc.aio.insecure_channel(services["orchestrator"].target) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
        results = await asyncio.wait_for(asyncio.gather(*(one_client(stub, c) for c in range(CLIENTS))), BOUND)

    clips_checked = 0
    for client, events in enumerate(results):
        by_image = defaultdict(list)
        for event in events:
            by_image[event.request_id].append(event)
        assert set(by_image) == {f"c{client}-i{i}" for i in range(IMAGES)}
        clip_ids_of_stream = set()
        for request_id, image_events in by_image.items():
            kinds = [e.WhichOneof("event") for e in image_events]
            assert "image_failed" not in kinds, [e.image_failed for e in image_events if e.image_failed.message]
            assert "clip_failed" not in kinds, [e.clip_failed.message for e in image_events if e.clip_failed.message]
            assert kinds.count("summary") == 1 and kinds[-1] == "summary"
            chunks = defaultdict(list)
            done = {}
            for e in image_events:
                if e.WhichOneof("event") == "audio":
                    chunks[e.audio.clip.clip_id].append(e.audio.chunk)
                elif e.WhichOneof("event") == "clip_done":
                    assert e.clip_done.clip.clip_id not in done  # no clip completed twice
                    done[e.clip_done.clip.clip_id] = e.clip_done
            assert set(chunks) == set(done)
            assert not clip_ids_of_stream & set(done)
            clip_ids_of_stream |= set(done)
            summary = image_events[-1].summary
            assert summary.clips_done == len(done) and summary.clips_failed == 0
            for clip_id, clip_chunks in chunks.items():
                assert [c.sequence_number for c in clip_chunks] == list(range(len(clip_chunks)))  # contiguous, no dups
                assert [c.last for c in clip_chunks].count(True) == 1 and clip_chunks[-1].last
                assert {c.encoding for c in clip_chunks} == {audio_encoding.PCM16}
                streamed = b"".join(c.data for c in clip_chunks)
                path = tmp_path / f"{clip_id}.wav"  # the samples as streamed, written as a PCM 16-bit WAV
                sf.write(path, np.frombuffer(streamed, dtype="<i2"), clip_chunks[0].sample_rate_hertz, subtype="PCM_16")
                written, rate = sf.read(path, dtype="int16")
                assert rate == 16000 and len(written) == done[clip_id].metadata.num_samples == 16000
                assert hashlib.sha256(written.astype("<i2").tobytes()).digest() == hashlib.sha256(streamed).digest()
                clips_checked += 1
        assert all(any(e.WhichOneof("event") == "clip_done" for e in by_image[f"c{client}-i{i}"]) for i in range(1, IMAGES))
    print(f"load: {CLIENTS} clients x {IMAGES} images, {clips_checked} clips checked, none lost or duplicated")


async def test_overload_beyond_the_limits_is_resource_exhausted_not_a_hang(services):
    """A second orchestrator with one image slot: a call that finds it taken is refused at once (no room to
    wait) or after the wait bound, with RESOURCE_EXHAUSTED; the holder completes."""
    from dataclasses import replace

    from orchestrator.config import OrchestratorConfig
    from orchestrator.server import Orchestrator
    from serving.server import ServerOptions

    for waiting, wait_seconds, fragment in ((0, 0.0, "0 waiting"), (4, 0.3, "no image slot within 0.3 s")):
        config = replace(OrchestratorConfig(vlm_target=services["vlm"].target, audio_target=services["audio"].target,
                                            server=ServerOptions(port=0, grace_seconds=1)),
                         max_images_total=1, max_images_waiting=waiting, admission_wait_seconds=wait_seconds)
        orchestrator = Orchestrator(config)
        await orchestrator.server.start()
        try:
            await orchestrator.wait_for_backends(timeout=60)
            await orchestrator.server.set_serving(True)
            async with grpc.aio.insecure_channel(orchestrator.server.address) as channel:
                stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
                holder = stub.ImageToSound(pb.ImageToSoundRequest(
                    description=scripted_description(sources=2, variants=1),
                    audio=common_pb2.AudioSettings(duration_seconds=1, num_inference_steps=40)), timeout=BOUND)
                assert (await asyncio.wait_for(holder.read(), BOUND)).WhichOneof("event") == "scene"  # admitted
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await asyncio.wait_for(stub.ImageToSound(pb.ImageToSoundRequest(
                        description=scripted_description(sources=1, variants=1)), timeout=BOUND).read(), BOUND)
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and fragment in info.value.details()
                rest = []
                while (event := await asyncio.wait_for(holder.read(), BOUND)) != grpc.aio.EOF:
                    rest.append(event)
                assert [e.WhichOneof("event") for e in rest].count("clip_done") == 2
        finally:
            await orchestrator.server.stop()
            await orchestrator.close()
