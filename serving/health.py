"""grpc.health.v1 for our servers (a Watch that keeps working) and clients (waiting for SERVING, mirroring
the health of the services behind us; no polling sleeps: Watch and channel connectivity)."""
from __future__ import annotations

import asyncio
from typing import AsyncIterator, Awaitable, Callable, Mapping

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


# What a health answer says besides the status (serving.fast_path: which path serves each model), sent as
# initial metadata "i2s-<key>" on Check and Watch, and in the SERVING log line. One process, one service.
DETAILS: dict[str, str] = {}


def set_detail(key: str, value: str) -> None:
    DETAILS[key] = value


def clear_detail(key: str) -> None:
    DETAILS.pop(key, None)


def _one_line(value: str) -> str:
    """Printable ASCII on one line: what a gRPC metadata value may hold (an exception's text may not)."""
    return " ".join(value.encode("ascii", "replace").decode().split())


def details_metadata() -> tuple[tuple[str, str], ...]:
    return tuple((f"i2s-{key}", _one_line(value)) for key, value in sorted(DETAILS.items()))


def details_text() -> str:
    return ", ".join(f"{key}={_one_line(value)}" for key, value in sorted(DETAILS.items()))


class HealthServicer(health.aio.HealthServicer):
    """The library's asyncio health servicer with a Watch that survives other watchers leaving.

    grpcio-health-checking 1.81's aio Watch deletes a service's condition as soon as any one watcher
    disconnects; every other watcher of that service then waits on an orphaned condition and never hears
    of a change again (one orchestrator replica restarting would leave the others blind to the model
    services' health). Here the condition stays for the life of the server. Once the server drains, a Watch
    ends after saying NOT_SERVING: clients that check health keep one open on every replica, and the drain
    waits for every call in flight. Uses the library's own `_server_status` / `_server_watchers` /
    `_gracefully_shutting_down` (pinned version; tests cover them).
    """

    watching = 0  # Watch streams open now (clients checking health: they need a moment to hear of a drain)

    async def Check(self, request: health_pb2.HealthCheckRequest, context):
        if DETAILS:
            await context.send_initial_metadata(details_metadata())
        return await super().Check(request, context)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context) -> None:
        condition = self._server_watchers[request.service]
        last_status = None
        self.watching += 1
        if DETAILS:
            await context.send_initial_metadata(details_metadata())
        try:
            async with condition:
                while True:
                    status = self._server_status.get(request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
                    if status != last_status:
                        await context.write(health_pb2.HealthCheckResponse(status=status))
                        last_status = status
                    if self._gracefully_shutting_down:
                        return  # NOT_SERVING is said: the stream must not hold the server's drain open
                    await condition.wait()
        finally:
            self.watching -= 1


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


async def channel_serving(channel: grpc.aio.Channel) -> AsyncIterator[bool]:
    """Yields whether at least one backend behind `channel` serves, at first and whenever that changes.

    The channel's service config turns on client-side health checking (serving.channels): a backend that is
    unreachable or says NOT_SERVING is out of round robin, and the channel is READY while at least one is in,
    TRANSIENT_FAILURE when none is. CONNECTING and IDLE (a connection reaching its maximum age, the channel
    idling between calls) decide nothing: the last answer stands."""
    C = grpc.ChannelConnectivity
    last: bool | None = None
    state = channel.get_state(try_to_connect=True)
    while state != C.SHUTDOWN:
        if state in (C.READY, C.TRANSIENT_FAILURE) or last is None:
            serving = state == C.READY
            if serving != last:
                last = serving
                yield serving
        await channel.wait_for_state_change(state)
        state = channel.get_state(try_to_connect=True)  # IDLE: connect again, so health is watched again
    if last is not False:
        yield False


async def wait_channel_serving(channel: grpc.aio.Channel, timeout: float | None = None) -> None:
    """Returns once at least one backend behind `channel` serves. Raises TimeoutError after `timeout`."""

    async def ready() -> None:
        async for serving in channel_serving(channel):
            if serving:
                return

    await asyncio.wait_for(ready(), timeout)


async def mirror_serving(
    channels: Mapping[str, grpc.aio.Channel], set_serving: Callable[[bool], Awaitable[None]]
) -> None:
    """Runs until cancelled: calls set_serving(True) while at least one backend behind each of `channels`
    serves and set_serving(False) as soon as one channel has none, so a readiness probe on a front service
    tells the truth about what is behind it. One draining replica of many does not count: its peers serve."""
    states: dict[str, bool] = {}

    async def update(name: str, serving: bool) -> None:
        if states.get(name) != serving:
            states[name] = serving
            if len(states) == len(channels):  # every channel has answered (new channels start unknown)
                await set_serving(all(states.values()))

    async def follow(name: str, channel: grpc.aio.Channel) -> None:
        async for serving in channel_serving(channel):
            await update(name, serving)

    await asyncio.gather(*(follow(name, channel) for name, channel in channels.items()))
