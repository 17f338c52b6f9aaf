"""GET /v1/ready: whether the orchestrator serves (its grpc.health.v1 status, which mirrors the model
services behind it), so the page can say "the models are still loading" and enable its button only when a
request can succeed. With ?wait=SECONDS (at most MAX_WAIT_SECONDS) the answer waits for SERVING on a
health Watch: the page asks again after each answer, with no timer of its own."""
from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from starlette.requests import Request
from starlette.responses import JSONResponse

from serving.health import wait_serving

PATH = "/v1/ready"
MAX_WAIT_SECONDS = 25.0  # under common proxies' idle timeouts


def readiness_endpoint(channel: grpc.aio.Channel):
    async def ready(request: Request) -> JSONResponse:
        try:
            wait = min(MAX_WAIT_SECONDS, max(0.0, float(request.query_params.get("wait", "0"))))
        except ValueError:
            return JSONResponse({"code": "invalid_argument", "message": "wait must be a number of seconds"}, 400)
        serving = False
        try:
            if wait > 0:
                await wait_serving(channel, "", timeout=wait)
                serving = True
            else:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2.0)
                serving = reply.status == health_pb2.HealthCheckResponse.SERVING
        except (TimeoutError, grpc.aio.AioRpcError):
            serving = False
        return JSONResponse({"serving": serving}, headers={"cache-control": "no-store"})

    return ready
