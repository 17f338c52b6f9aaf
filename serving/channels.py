"""gRPC channels to the model services and for clients: message sizes, keepalive, round robin over the
backends that say SERVING, retries on UNAVAILABLE."""
from __future__ import annotations

import json

import grpc

from serving import tracing

MiB = 1024 * 1024


def channel_options(max_message_bytes: int = 32 * MiB, keepalive_seconds: float = 30.0) -> list[tuple[str, int]]:
    """Options for servers and clients alike: big messages, keepalive pings so dead peers are noticed."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", int(keepalive_seconds * 1000)),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ]


# Client-side health checking: each backend's grpc.health.v1 Watch of the whole server ("") decides whether
# round robin picks it, so a draining or loading replica gets no new calls while its peers do, and the
# channel is READY while at least one backend serves (serving.health.channel_serving reads that).
# Retries are safe: every RPC of this system is a pure function of its request (seeds included).
# UNAVAILABLE covers a service that is restarting or still loading its model.
SERVICE_CONFIG = json.dumps({
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": ""},
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
    return channel_options(max_message_mb * MiB) + [
        ("grpc.service_config", SERVICE_CONFIG),
        ("grpc.enable_retries", 1),
    ]


def channel_credentials(
    credentials: grpc.ChannelCredentials | None, call_credentials: grpc.CallCredentials | None
) -> grpc.ChannelCredentials | None:
    """TLS channel credentials combined with per-call credentials (a bearer token), or None for plaintext.

    gRPC sends call credentials only over a secure channel. A token without TLS is allowed on loopback
    alone (local credentials: tests, one-machine setups); elsewhere it would cross the network in clear.
    """
    if call_credentials is None:
        return credentials
    base = credentials if credentials is not None else grpc.local_channel_credentials()
    return grpc.composite_channel_credentials(base, call_credentials)


def aio_channel(
    target: str,
    credentials: grpc.ChannelCredentials | None = None,
    call_credentials: grpc.CallCredentials | None = None,
) -> grpc.aio.Channel:
    """An asyncio channel; plaintext unless credentials are given. With tracing on, its calls carry the
    caller's trace context (W3C traceparent metadata) and make client spans."""
    creds = channel_credentials(credentials, call_credentials)
    interceptors = tracing.client_interceptors() or None
    if creds is None:
        return grpc.aio.insecure_channel(target, options=options(), interceptors=interceptors)
    return grpc.aio.secure_channel(target, creds, options=options(), interceptors=interceptors)


def answers(
    target: str,
    credentials: grpc.ChannelCredentials | None = None,
    call_credentials: grpc.CallCredentials | None = None,
    timeout: float = 1.0,
) -> bool:
    """Whether a server at `target` answers the health protocol at all, serving or not. The channels above
    cannot tell: their health-checked round robin keeps a NOT_SERVING server out of reach, so "still loading"
    and "nothing there" look alike to them. A one-shot plain channel can."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    creds = channel_credentials(credentials, call_credentials)
    plain = (grpc.insecure_channel(target, options=channel_options()) if creds is None
             else grpc.secure_channel(target, creds, options=channel_options()))
    try:
        health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout,
                                                wait_for_ready=True)
        return True
    except grpc.RpcError as exc:  # NOT_FOUND or UNAUTHENTICATED still mean someone is there
        return exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        plain.close()


def sync_channel(
    target: str,
    credentials: grpc.ChannelCredentials | None = None,
    call_credentials: grpc.CallCredentials | None = None,
) -> grpc.Channel:
    """A blocking channel (the synchronous client); plaintext unless credentials are given."""
    creds = channel_credentials(credentials, call_credentials)
    if creds is None:
        return grpc.insecure_channel(target, options=options())
    return grpc.secure_channel(target, creds, options=options())
