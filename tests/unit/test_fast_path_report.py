"""serving.fast_path: the comparison's verdicts, and a report reaching the metric and the health answers."""
from __future__ import annotations

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from serving import fast_path, health
from serving.health import HealthServicer


def test_compare_accepts_noise_within_the_tolerance_and_catches_a_wrong_result():
    tol = fast_path.tolerance(torch.bfloat16)
    eager = torch.randn(4, 100, generator=torch.Generator().manual_seed(0)) * 5
    assert fast_path.compare(eager + 0.01, eager, tol, rows_argmax=True) is None
    assert "max |delta|" in fast_path.compare(-eager, eager, tol, rows_argmax=True)
    assert "non-finite" in fast_path.compare(eager * float("nan"), eager, tol)
    near_tie = torch.tensor([[1.0, 1.0 + 1e-3, 0.0]])
    assert fast_path.compare(torch.tensor([[1.0 + 1e-3, 1.0, 0.0]]), near_tie, tol, rows_argmax=True) is None
    assert fast_path.tolerance("float32").atol < tol.atol


async def test_a_report_sets_one_path_and_every_health_answer_carries_it():
    fast_path.report("probe", "compiled")
    fast_path.report("probe", "eager", "the compiled forward\ndisagreed")  # an exception's text: lines
    assert REGISTRY.get_sample_value("i2s_fast_path", {"service": "probe", "path": "eager"}) == 1.0
    assert REGISTRY.get_sample_value("i2s_fast_path", {"service": "probe", "path": "compiled"}) is None
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
            assert (await call).status == health_pb2.HealthCheckResponse.SERVING
            metadata = dict(await call.initial_metadata())
        assert metadata["i2s-probe-path"] == "eager"
        assert metadata["i2s-probe-path-reason"] == "the compiled forward disagreed"
        assert "probe-path=eager" in health.details_text()
    finally:
        await server.stop(None)
        for key in ("probe-path", "probe-path-reason"):
            health.clear_detail(key)
