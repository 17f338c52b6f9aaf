"""grpc.health.v1 for our servers (a Watch that keeps working) and clients (waiting for SERVING, mirroring
the health of the services behind us; no polling sleeps: Watch)."""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Mapping

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


class HealthServicer(health.aio.HealthServicer):
    """The library's asyncio health servicer with a Watch that survives other watchers leaving.

    grpcio-health-checking 1.81's aio Watch deletes a service's condition as soon as any one watcher
    disconnects; every other watcher of that service then waits on an orphaned condition and never hears
    of a change again (one orchestrator replica restarting would leave the others blind to the model
    services' health). Here the condition stays for the life of the server. Uses the library's own
    `_server_status` / `_server_watchers` (pinned version; a test covers it).
    """

    async def Watch(self, request: health_pb2.HealthCheckRequest, context) -> None:
        condition = self._server_watchers[request.service]
        last_status = None
        async with condition:
            while True:
                status = self._server_status.get(request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
                if status != last_status:
                    await context.write(health_pb2.HealthCheckResponse(status=status))
                    last_status = status
                await condition.wait()


async def wait_serving(channel: grpc.aio.Channel, service: str = "", timeout: float | None = None) -> None:
    """Returns once `service` on `channel` reports SERVING; retries while the server is not up yet.
    Raises TimeoutError after `timeout` seconds."""

    async def watch() -> None:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            call = stub.Watch(health_pb2.HealthCheckRequest(service=service), wait_for_ready=True)
            try:
                async for response in call:
                    if response.status == health_pb2.HealthCheckResponse.SERVING:
                        return
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    raise
                # The server went away (restart); wait_for_ready blocks the next Watch until it is back.
            finally:
                call.cancel()  # don't leave an open stream behind on the server

    await asyncio.wait_for(watch(), timeout)


async def mirror_serving(
    channels: Mapping[str, grpc.aio.Channel], set_serving: Callable[[bool], Awaitable[None]]
) -> None:
    """Runs until cancelled: calls set_serving(True) while every service behind `channels` says SERVING
    and set_serving(False) as soon as one does not (or cannot be reached), so a readiness probe on a
    front service tells the truth about what is behind it."""
    states = {name: True for name in channels}  # called right after all were seen SERVING

    async def update(name: str, serving: bool) -> None:
        if states[name] != serving:
            states[name] = serving
            await set_serving(all(states.values()))

    async def watch(name: str, channel: grpc.aio.Channel) -> None:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                async for response in stub.Watch(health_pb2.HealthCheckRequest(service=""), wait_for_ready=True):
                    await update(name, response.status == health_pb2.HealthCheckResponse.SERVING)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    await asyncio.sleep(1.0)  # e.g. UNIMPLEMENTED: not a reason to spin
                # UNAVAILABLE: the service went away; wait_for_ready holds the next Watch until it is back.
            await update(name, False)

    await asyncio.gather(*(watch(name, channel) for name, channel in channels.items()))
