"""Model services with several replicas behind one DNS name, as a headless Kubernetes Service gives them.

Each replica is a fake model service (tests/fake_replica.py) in its own process, on its own loopback address
(127.0.0.2, .3, ...: the same port on every replica, like pod IPs); a DNS server on loopback (dnslib) answers
the service names with the replicas' addresses, and the orchestrator dials `dns://<that server>/<name>:<port>`
with its production channels. The fakes stand in for the models only: the orchestrator, the channels, health
checking and the replicas' life cycle (SIGTERM: NOT_SERVING, drain, exit 0) are the real code.
"""
from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from i2s_client import AsyncImageToSoundClient
from serving import channels
from tests.real_stack import ServiceProcess

BOUND = 60  # seconds: a broken path fails the test instead of hanging it
AGE, GRACE = 2.0, 3.0  # the replicas' maximum connection age and its grace, short for the test
SERVING = health_pb2.HealthCheckResponse.SERVING
pytestmark = pytest.mark.faults


class FakeReplicaDns:
    """An authoritative DNS server on loopback whose A records the test changes (endpoints coming and going)."""

    def __init__(self):
        from dnslib import QTYPE, RR, A
        from dnslib.server import BaseResolver, DNSLogger, DNSServer

        records = self.records = {}

        class Resolver(BaseResolver):
            def resolve(self, request, handler):
                reply = request.reply()
                name = str(request.q.qname).rstrip(".")
                if QTYPE[request.q.qtype] == "A":
                    for ip in list(records.get(name, ())):
                        reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(ip), ttl=0))
                return reply

        self.server = DNSServer(Resolver(), address="127.0.0.1", port=0,
                                logger=DNSLogger("-request,-reply,-truncated,-error,-recv,-send,-data"))
        self.server.start_thread()
        self.address = f"127.0.0.1:{self.server.server.server_address[1]}"

    def target(self, name: str, port: int) -> str:
        return f"dns://{self.address}/{name}:{port}"

    def stop(self) -> None:
        self.server.stop()


def replica(kind: str, name: str, host: str, port: int = 0) -> ServiceProcess:
    return ServiceProcess("tests.fake_replica", ["--kind", kind, "--name", name, "--grace-seconds", str(GRACE),
                                                 "--max-connection-age-seconds", str(AGE),
                                                 "--max-connection-age-grace-seconds", str(GRACE)],
                          port=port, host=host)


@pytest.fixture
def image_bytes():
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 120, 200)).save(buf, format="PNG")
    return buf.getvalue()


async def served_by(client: AsyncImageToSoundClient, image: bytes) -> tuple[str, str]:
    """Runs one image; returns (VLM replica, audio replica) that served it. Any failure fails the test."""
    events = [e async for e in client.stream(image, duration_seconds=1, timeout=BOUND)]
    kinds = [e.WhichOneof("event") for e in events]
    assert "image_failed" not in kinds and "clip_failed" not in kinds, events
    vlm = {e.description.model_id for e in events if e.HasField("description")}
    audio = {e.clip_done.metadata.model_id for e in events if e.HasField("clip_done")}
    assert len(vlm) == 1 and len(audio) == 1, events
    return vlm.pop(), audio.pop()


async def not_serving(target: str) -> None:
    """Returns once the replica at `target` says NOT_SERVING (what every client watching its health hears)."""
    async def watch():
        async with grpc.aio.insecure_channel(target) as channel:
            async for response in health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest()):
                if response.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    return
    await asyncio.wait_for(watch(), BOUND)


@contextlib.asynccontextmanager
async def orchestrator_for(vlm_target: str, audio_target: str):
    from orchestrator.config import OrchestratorConfig
    from orchestrator.server import Orchestrator
    from serving.server import ServerOptions

    config = OrchestratorConfig(vlm_target=vlm_target, audio_target=audio_target,
                                server=ServerOptions(port=0, grace_seconds=0.5))
    orchestrator = Orchestrator(config)
    await orchestrator.server.start()
    try:
        await orchestrator.wait_for_backends(timeout=BOUND)
        await orchestrator.server.set_serving(True)
        yield orchestrator.server.address
    finally:
        await orchestrator.server.stop()
        await orchestrator.close()


async def test_draining_replica_keeps_the_orchestrator_serving_and_a_new_replica_gets_calls(image_bytes, monkeypatch):
    # gRPC's DNS resolver re-resolves at most every 30 s; the test's connection age is 2 s, so allow it sooner.
    production_options = channels.options
    monkeypatch.setattr(channels, "options", lambda *a, **k: production_options(*a, **k) + [
        ("grpc.dns_min_time_between_resolutions_ms", 200)])
    dns = FakeReplicaDns()
    processes: list[ServiceProcess] = []

    def start(kind: str, name: str, host: str, port: int = 0) -> ServiceProcess:
        processes.append(replica(kind, name, host, port))
        return processes[-1]

    try:
        vlm_a = await start("vision", "fake-vlm-a", "127.0.0.2").serving(BOUND)
        audio_a = await start("audio", "fake-audio-a", "127.0.0.2").serving(BOUND)
        vlm_b, audio_b = start("vision", "fake-vlm-b", "127.0.0.3", vlm_a.port), \
            start("audio", "fake-audio-b", "127.0.0.3", audio_a.port)
        await asyncio.gather(vlm_b.serving(BOUND), audio_b.serving(BOUND))
        dns.records.update({"vlm.test": ["127.0.0.2", "127.0.0.3"], "audio.test": ["127.0.0.2", "127.0.0.3"]})

        async with orchestrator_for(dns.target("vlm.test", vlm_a.port), dns.target("audio.test", audio_a.port)) \
                as target, AsyncImageToSoundClient(target) as client, grpc.aio.insecure_channel(target) as channel:
            # Round robin spreads images over both replicas of each service.
            served = [await served_by(client, image_bytes) for _ in range(4)]
            assert {v for v, _ in served} == {"fake-vlm-a", "fake-vlm-b"}
            assert {a for _, a in served} == {"fake-audio-a", "fake-audio-b"}

            # The orchestrator's health from here on: every status it reports.
            statuses: list[int] = []
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))

            async def record():
                async for response in watch:
                    statuses.append(response.status)

            recorder = asyncio.create_task(record())

            # Replica A of each service drains (SIGTERM) and leaves the endpoints, as a terminating pod does.
            dns.records.update({"vlm.test": ["127.0.0.3"], "audio.test": ["127.0.0.3"]})
            exits = asyncio.gather(vlm_a.terminate(BOUND), audio_a.terminate(BOUND))
            await asyncio.gather(not_serving(vlm_a.target), not_serving(audio_a.target))  # its drain notice began
            served = [await served_by(client, image_bytes) for _ in range(4)]
            assert served == [("fake-vlm-b", "fake-audio-b")] * 4
            assert await exits == [0, 0]  # drained and exited cleanly
            served = [await served_by(client, image_bytes) for _ in range(2)]
            assert served == [("fake-vlm-b", "fake-audio-b")] * 2
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=BOUND)
            assert health.status == SERVING
            watch.cancel()
            await asyncio.gather(recorder, return_exceptions=True)
            assert statuses and set(statuses) == {SERVING}, statuses  # never out of rotation

            # Replica C starts after the orchestrator connected and joins the endpoints: once B's connections
            # reach their maximum age, the orchestrator re-resolves and C gets calls too.
            vlm_c, audio_c = start("vision", "fake-vlm-c", "127.0.0.4", vlm_a.port), \
                start("audio", "fake-audio-c", "127.0.0.4", audio_a.port)
            await asyncio.gather(vlm_c.serving(BOUND), audio_c.serving(BOUND))
            dns.records.update({"vlm.test": ["127.0.0.3", "127.0.0.4"], "audio.test": ["127.0.0.3", "127.0.0.4"]})

            async def until_both_served_by_c() -> int:
                seen, images = set(), 0
                while seen != {"fake-vlm-c", "fake-audio-c"}:
                    seen |= {name for name in await served_by(client, image_bytes) if name.endswith("-c")}
                    images += 1
                return images

            # Bounded by several connection ages and graces; without a maximum age it would never happen.
            assert await asyncio.wait_for(until_both_served_by_c(), 4 * (AGE + GRACE) + 10) >= 1
    finally:
        for process in processes:
            process.close()
        dns.stop()
