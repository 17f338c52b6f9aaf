"""Two audio service processes (tiny AudioLDM2) sharing one real Redis (`--cache-url`): the second serves
the clip the first rendered, the same bytes, without running its model."""
from __future__ import annotations

import subprocess
import sys

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from image_to_sound.v1 import audio_pb2, audio_pb2_grpc, common_pb2
from serving.health import wait_serving
from tests.redis_server import free_port, redis_server

pytestmark = pytest.mark.e2e
WAIT = 300  # seconds: loading the tiny model in a fresh process on a busy machine


def start_audio_service(model_dir, cache_url: str, log) -> tuple[subprocess.Popen, int, int]:
    port, metrics_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "audio_service", "--model", str(model_dir), "--device", "cpu", "--host", "127.0.0.1",
         "--port", str(port), "--metrics-port", str(metrics_port), "--torch-threads", "1", "--max-wait-ms", "0",
         "--cache-url", cache_url], stdout=log, stderr=subprocess.STDOUT)
    return process, port, metrics_port


def samples(metrics_port: int) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_the_second_replica_serves_the_first_replicas_clip(tiny_audio_dir, tmp_path):
    request = audio_pb2.GenerateAudioRequest(prompt="Rain drumming on a tin roof", clip_id="shared",
                                             settings=common_pb2.AudioSettings(duration_seconds=1.0,
                                                                               num_inference_steps=2, seed=42))
    with redis_server(tmp_path) as redis, open(tmp_path / "services.log", "wb") as log:
        replicas = [start_audio_service(tiny_audio_dir, redis.url, log) for _ in range(2)]
        try:
            clips = []
            for _, port, _ in replicas:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    await wait_serving(channel, timeout=WAIT)
                    stub = audio_pb2_grpc.AudioServiceStub(channel)
                    chunks = [r.chunk async for r in stub.GenerateAudio(request, timeout=WAIT)
                              if r.WhichOneof("event") == "chunk"]
                    clips.append((b"".join(c.data for c in chunks), chunks[-1].metadata))
            (first, first_meta), (second, second_meta) = clips
            assert second == first and not first_meta.cache_hit and second_meta.cache_hit
            hit = ("i2s_cache_lookups_total", (("cache", "audio"), ("result", "hit")))
            rendered = ("i2s_audio_batch_size_count", ())
            one, two = samples(replicas[0][2]), samples(replicas[1][2])
            assert one[rendered] == 1 and one.get(hit, 0) == 0
            assert two[rendered] == 0 and two[hit] == 1  # the second replica's model never ran
        finally:
            for process, _, _ in replicas:
                process.terminate()
            codes = [process.wait(WAIT) for process, _, _ in replicas]
    assert codes == [0, 0], (tmp_path / "services.log").read_text(errors="replace")[-3000:]
