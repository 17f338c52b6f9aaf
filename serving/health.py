"""Client side of grpc.health.v1: waiting for a service to say SERVING (no polling sleeps: Watch)."""
from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


async def wait_serving(channel: grpc.aio.Channel, service: str = "", timeout: float | None = None) -> None:
    """Returns once `service` on `channel` reports SERVING; retries while the server is not up yet.
    Raises TimeoutError after `timeout` seconds."""

    async def watch() -> None:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                async for response in stub.Watch(health_pb2.HealthCheckRequest(service=service), wait_for_ready=True):
                    if response.status == health_pb2.HealthCheckResponse.SERVING:
                        return
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    raise
                # The server went away (restart); wait_for_ready blocks the next Watch until it is back.

    await asyncio.wait_for(watch(), timeout)
