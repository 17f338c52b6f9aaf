"""gRPC statuses from the orchestrator -> Connect errors, and Connect errors -> HTTP statuses by the Connect
protocol's published table (connectrpc's own, so Connect and JSON-lines callers see the same)."""
from __future__ import annotations

import grpc
from connectrpc._protocol import ConnectWireError  # the protocol's code -> HTTP status table
from connectrpc.code import Code
from connectrpc.errors import ConnectError

MESSAGE_CHARS = 500  # messages are the gRPC port's (already free of internals); bounded once more here


def _connect_code(code: grpc.StatusCode | None) -> Code:
    if code is None:
        return Code.UNKNOWN
    name = "CANCELED" if code == grpc.StatusCode.CANCELLED else code.name
    return Code.__members__.get(name, Code.UNKNOWN)


def from_grpc(error: grpc.aio.AioRpcError) -> ConnectError:
    return ConnectError(_connect_code(error.code()), (error.details() or "")[:MESSAGE_CHARS])


def http_status(error: ConnectError) -> int:
    return ConnectWireError.from_exception(error).to_http_status().code


def error_json(error: ConnectError) -> dict:
    """The Connect error body: {"code": "invalid_argument", "message": "..."}."""
    return {"code": error.code.value, "message": error.message[:MESSAGE_CHARS]}
