"""The ASGI app of the HTTP front: the page and its modules at /, JSON lines at /v1/image-to-sound, readiness
at /v1/ready, and the Connect / gRPC-Web service at /image_to_sound.v1.Orchestrator/*."""
from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import FileResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from gateway import json_lines, readiness
from i2s_formats import contract
from gateway.connect_service import connect_app
from gateway.upstream import Upstream

STATIC = Path(__file__).parent / "static"
# The page loads only its own modules and styles; audio and images it makes are blob: URLs; it talks only
# to this origin. No inline script, no eval, no third-party anything.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
                           "media-src 'self' blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
                           "frame-ancestors 'none'")
SECURITY_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


class SecurityHeaders:
    """Adds the headers above to every response (pure ASGI, so streaming responses are not buffered)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(upstream: Upstream, cors_origins: str = "") -> Starlette:
    connect = connect_app(upstream)
    middleware = [Middleware(SecurityHeaders)]
    origins = [o.strip() for o in cors_origins.split(",") if o.strip()]
    if origins:  # off unless configured: the page itself is same-origin
        middleware.append(Middleware(
            CORSMiddleware, allow_origins=origins, allow_methods=["POST", "GET"],
            allow_headers=["authorization", contract.PRIORITY_HEADER, "content-type",
                            "connect-protocol-version", "connect-timeout-ms",
                           "x-grpc-web", "x-user-agent"],
            expose_headers=["grpc-status", "grpc-message"]))
    return Starlette(
        routes=[
            Route("/", lambda request: FileResponse(STATIC / "index.html"), methods=["GET", "HEAD"]),
            Route(json_lines.PATH, json_lines.json_lines_endpoint(upstream), methods=["POST"]),
            Route(readiness.PATH, readiness.readiness_endpoint(upstream.channel), methods=["GET"]),
            Mount(connect.path, app=connect),
            Mount("/static", app=StaticFiles(directory=STATIC)),
        ],
        middleware=middleware,
    )
