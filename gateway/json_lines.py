"""POST /v1/image-to-sound: one ImageToSoundRequest as proto JSON in, its events out as JSON lines
(one proto-JSON ImageToSoundEvent a line), for curl and for the page. Errors before the first event get
the Connect table's HTTP status and a Connect error body; an error after it is a last line {"error": ...}."""
from __future__ import annotations

import asyncio
import json

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from google.protobuf import json_format
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from gateway.errors import error_json, http_status
from gateway.upstream import Upstream
from image_to_sound.v1 import orchestrator_pb2 as pb

PATH = "/v1/image-to-sound"
MEDIA_TYPE = "application/x-ndjson"
# A JSON body carries the image in base64 (4/3 of its size) plus a little JSON around it.
JSON_OVERHEAD_BYTES = 64 * 1024


class BodyTooLarge(Exception):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise BodyTooLarge
    return bytes(body)


def _timeout_seconds(request: Request) -> float | None:
    # The Connect protocol's deadline header, so both routes take a deadline the same way.
    raw = request.headers.get("connect-timeout-ms", "")
    if not raw:
        return None
    if not raw.isdigit() or len(raw) > 10:
        raise ConnectError(Code.INVALID_ARGUMENT, "connect-timeout-ms must be a positive integer of at most 10 digits")
    return int(raw) / 1000


def _error(error: ConnectError) -> JSONResponse:
    return JSONResponse(error_json(error), status_code=http_status(error))


async def _caller_left(request: Request) -> None:
    """Returns when the caller disconnects (the body has been read: receive() has nothing else to say)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _first_event(events, request: Request) -> pb.ImageToSoundEvent | None:
    """The stream's first event, or None when it ends without one. Until then nothing is sent, so nothing
    would notice the caller leaving before the whole image was described and rendered: the caller is
    watched meanwhile, and leaving cancels the call (ClientDisconnect). From the first event on, the
    streaming response watches the caller itself."""
    first = asyncio.ensure_future(anext(events, None))
    left = asyncio.ensure_future(_caller_left(request))
    try:
        await asyncio.wait((first, left), return_when=asyncio.FIRST_COMPLETED)
    finally:
        left.cancel()
        if not first.done():
            first.cancel()  # inside the stream: its `finally` cancels the gRPC call
        await asyncio.gather(first, left, return_exceptions=True)
    if first.cancelled():
        raise ClientDisconnect
    return first.result()


def _line(event: pb.ImageToSoundEvent) -> bytes:
    return json.dumps(json_format.MessageToDict(event), separators=(",", ":")).encode() + b"\n"


def json_lines_endpoint(upstream: Upstream):
    limit = upstream.max_message_bytes * 4 // 3 + JSON_OVERHEAD_BYTES

    async def endpoint(request: Request) -> Response:
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            return Response(status_code=415, headers={"Accept-Post": "application/json"})
        try:
            body = await _read_body(request, limit)
        except BodyTooLarge:
            # 413, not the table's 429 for resource_exhausted: retrying the same body cannot succeed.
            too_large = ConnectError(Code.RESOURCE_EXHAUSTED, f"request body larger than {limit} bytes")
            return JSONResponse(error_json(too_large), status_code=413)
        except ClientDisconnect:
            return Response(status_code=499)
        try:
            message = json_format.Parse(body, pb.ImageToSoundRequest())
            timeout = _timeout_seconds(request)
        except (json_format.ParseError, ValueError) as exc:  # bad JSON, bad base64, not UTF-8
            return _error(ConnectError(Code.INVALID_ARGUMENT, f"malformed ImageToSoundRequest JSON: {exc}"))
        except ConnectError as exc:
            return _error(exc)

        events = upstream.image_to_sound(message, request.headers, timeout)
        # Wait for the first event before answering, so a refusal (token, validation, admission) gets its
        # HTTP status rather than a 200 with an error line.
        try:
            first = await _first_event(events, request)
        except ConnectError as exc:
            return _error(exc)
        except ClientDisconnect:
            return Response(status_code=499)  # nobody reads it: the caller's work is already cancelled

        async def lines():
            try:
                if first is not None:
                    yield _line(first)
                    async for event in events:
                        yield _line(event)
            except ConnectError as exc:
                yield json.dumps({"error": error_json(exc)}).encode() + b"\n"
            finally:
                await events.aclose()

        return StreamingResponse(lines(), media_type=MEDIA_TYPE, headers={"Cache-Control": "no-store"})

    return endpoint
