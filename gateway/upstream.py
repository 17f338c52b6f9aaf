"""The one path every HTTP call takes into the orchestrator: a gRPC call to its own server (over a private
Unix socket in the orchestrator process), carrying the caller's token and deadline. The gRPC server's
interceptors and servicer then do authentication, validation, admission, deadlines and error mapping."""
from __future__ import annotations

from typing import AsyncIterator, Mapping

import grpc

from gateway.errors import from_grpc
from i2s_formats import contract
from image_to_sound.v1 import orchestrator_pb2 as pb, orchestrator_pb2_grpc
from serving.channels import channel_options

# Request headers passed on as gRPC metadata: the bearer token, checked by the gRPC server's interceptor, and
# `I2S-Priority: interactive|batch`, resolved by the request contract when the body sets no priority.
FORWARDED_HEADERS = ("authorization", contract.PRIORITY_HEADER)


class Upstream:
    def __init__(self, target: str, max_message_bytes: int):
        self.max_message_bytes = max_message_bytes
        self.channel = grpc.aio.insecure_channel(target, options=channel_options(max_message_bytes))
        self.stub = orchestrator_pb2_grpc.OrchestratorStub(self.channel)

    async def image_to_sound(self, request: pb.ImageToSoundRequest, headers: Mapping[str, str],
                             timeout_seconds: float | None) -> AsyncIterator[pb.ImageToSoundEvent]:
        """The gRPC stream's events; a gRPC error becomes a ConnectError with the same code and message."""
        metadata = [(name, headers[name]) for name in FORWARDED_HEADERS if headers.get(name)]
        call = self.stub.ImageToSound(request, metadata=metadata, timeout=timeout_seconds)
        try:
            async for event in call:
                yield event
        except grpc.aio.AioRpcError as exc:
            raise from_grpc(exc) from None
        finally:
            call.cancel()  # the HTTP caller went away: stop the work (a no-op once the call is done)

    async def close(self) -> None:
        await self.channel.close()
