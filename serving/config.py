"""Helpers for service configs: each service has one frozen dataclass built from flags, with every flag
also readable from the environment (I2S_<FLAG>, e.g. I2S_PORT), so a Kubernetes manifest can set either."""
from __future__ import annotations

import argparse
import os

from serving.server import ServerOptions


def env_default(name: str, default):
    """The value of I2S_<NAME> converted to the type of `default`, or `default`."""
    raw = os.environ.get("I2S_" + name.upper().replace("-", "_"))
    if raw is None:
        return default
    if isinstance(default, bool):
        return raw.lower() in ("1", "true", "yes", "on")
    if default is None:
        return raw
    return type(default)(raw)


def add_server_flags(parser: argparse.ArgumentParser, default_port: int) -> None:
    """--host --port --metrics-port --grace-seconds --max-message-mb, shared by all services."""
    parser.add_argument("--host", default=env_default("host", "127.0.0.1"), help="address to bind (0.0.0.0 in a pod)")
    parser.add_argument("--port", type=int, default=env_default("port", default_port), help="gRPC port (0: any free port)")
    parser.add_argument("--metrics-port", type=int, default=env_default("metrics_port", -1),
                        help="Prometheus /metrics port (-1: off, 0: any free port)")
    parser.add_argument("--grace-seconds", type=float, default=env_default("grace_seconds", 10.0),
                        help="on SIGTERM, how long in-flight requests may finish")
    parser.add_argument("--max-message-mb", type=int, default=env_default("max_message_mb", 32),
                        help="largest gRPC message accepted (images up to 20 MB)")
    parser.add_argument("--port-file", default=env_default("port_file", None),
                        help="write the bound port to this file once listening (with --port 0)")


def server_options(args: argparse.Namespace) -> ServerOptions:
    return ServerOptions(
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        grace_seconds=args.grace_seconds,
        max_message_bytes=args.max_message_mb * 1024 * 1024,
        port_file=args.port_file,
    )


def hf_token() -> str | None:
    """The Hugging Face token: HUGGING_FACE_TOKEN (the seed's name) or the standard HF_TOKEN."""
    return os.environ.get("HUGGING_FACE_TOKEN") or os.environ.get("HF_TOKEN") or None
