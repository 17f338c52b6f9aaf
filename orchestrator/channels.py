"""gRPC channels to the model services and for clients: message sizes, keepalive, retries on UNAVAILABLE."""
from __future__ import annotations

import json

import grpc

from serving.server import channel_options

# Retries are safe: every RPC of this system is a pure function of its request (seeds included).
# UNAVAILABLE covers a service that is restarting or still loading its model.
RETRY_SERVICE_CONFIG = json.dumps({
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [{
        "name": [{"service": "image_to_sound.v1.VisionService"}, {"service": "image_to_sound.v1.AudioService"},
                 {"service": "image_to_sound.v1.Orchestrator"}],
        "retryPolicy": {
            "maxAttempts": 5,
            "initialBackoff": "0.2s",
            "maxBackoff": "5s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }],
})


def options(max_message_mb: int = 32) -> list[tuple[str, object]]:
    return channel_options(max_message_mb * 1024 * 1024) + [
        ("grpc.service_config", RETRY_SERVICE_CONFIG),
        ("grpc.enable_retries", 1),
    ]


def aio_channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=options())


def sync_channel(target: str) -> grpc.Channel:
    return grpc.insecure_channel(target, options=options())
