"""The Orchestrator service over Connect (JSON and binary protobuf, HTTP/1.1 and HTTP/2) and gRPC-Web,
served by connectrpc from the stubs that setup.py generates from orchestrator.proto."""
from __future__ import annotations

from typing import AsyncIterator

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext

from gateway.upstream import FORWARDED_HEADERS, Upstream
from image_to_sound.v1 import orchestrator_pb2 as pb
from image_to_sound.v1.orchestrator_connect import OrchestratorASGIApplication


class ConnectOrchestrator:
    def __init__(self, upstream: Upstream):
        self.upstream = upstream

    async def image_to_sound(self, request: pb.ImageToSoundRequest, ctx: RequestContext) -> AsyncIterator[pb.ImageToSoundEvent]:
        timeout_ms = ctx.timeout_ms
        headers = {name: ctx.request_headers.get(name, "") for name in FORWARDED_HEADERS}
        async for event in self.upstream.image_to_sound(
                request, headers, None if timeout_ms is None else timeout_ms / 1000):
            yield event

    async def stream_images_to_sound(self, request, ctx: RequestContext):
        # Bidirectional streaming needs HTTP/2 end to end, which browsers' fetch cannot do: gRPC port only.
        raise ConnectError(Code.UNIMPLEMENTED, "StreamImagesToSound is served on the gRPC port only")
        yield  # pragma: no cover - makes this an async generator


def connect_app(upstream: Upstream) -> OrchestratorASGIApplication:
    # read_max_bytes: the gRPC port's message limit, so an upload too big for one is too big for the other.
    return OrchestratorASGIApplication(ConnectOrchestrator(upstream), read_max_bytes=upstream.max_message_bytes)
