"""Server start-up shared by the three services: health transitions, reflection, metrics endpoint."""
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.server import GrpcServer, ServerOptions


async def test_health_goes_not_serving_serving_not_serving_and_metrics_are_served():
    server = GrpcServer(ServerOptions(host="127.0.0.1", port=0, metrics_port=0, grace_seconds=0.1),
                        lambda s: None, ["image_to_sound.v1.Example"])
    await server.start()
    async with grpc.aio.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        async def status(service=""):
            return (await health.Check(health_pb2.HealthCheckRequest(service=service))).status

        assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await status("image_to_sound.v1.Example") == health_pb2.HealthCheckResponse.NOT_SERVING
        await server.set_serving(True)
        assert await status() == health_pb2.HealthCheckResponse.SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        await server.health.enter_graceful_shutdown()  # what SIGTERM does first
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    assert "i2s_rpcs_total" in body and "i2s_rpc_seconds" in body
    await server.stop()


async def test_port_file_reports_the_bound_port(tmp_path):
    server = GrpcServer(ServerOptions(host="127.0.0.1", port=0, port_file=str(tmp_path / "port")), lambda s: None, [])
    port = await server.start()
    assert port > 0 and (tmp_path / "port").read_text().strip() == str(port)
    await server.stop()
