"""Container health check: exit 0 when the service in this container says SERVING on grpc.health.v1.

    python healthcheck.py vlm_service|audio_service|orchestrator [--service NAME] [--timeout S] [--server-name N]

The port, bind address and TLS files come from the service's own configuration, read from the same
environment (I2S_<SERVICE>_*) that the service reads, so the check follows the service wherever it is
configured to listen. Docker's HEALTHCHECK runs it; on Kubernetes the native gRPC probe does the same job,
and this script replaces it only where the port speaks TLS (kubelet's gRPC probe cannot).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVICES = ("vlm_service", "audio_service", "orchestrator")
WILDCARDS = ("", "0.0.0.0", "::", "[::]")


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


def target_and_credentials(config, server_name: str) -> tuple[str, grpc.ChannelCredentials | None, list]:
    """Where to dial (the service's own bind address; loopback for a wildcard) and how: TLS when the service
    serves TLS, trusting the CA the pod holds (its client CA, or the orchestrator's downstream CA) and
    presenting the service's own certificate when the service asks clients for one (mutual TLS)."""
    server = config.server
    host = "127.0.0.1" if server.host in WILDCARDS else server.host
    target = f"[{host}]:{server.port}" if ":" in host else f"{host}:{server.port}"
    cert_file = getattr(server, "tls_cert_file", None)  # TLS settings: ServerOptions (security work)
    if not cert_file:
        return target, None, []
    client_ca = getattr(server, "tls_client_ca_file", None)
    ca_file = client_ca or getattr(config, "downstream_tls_ca_file", None)
    key_file = getattr(server, "tls_key_file", None)
    mutual = bool(client_ca and key_file)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file) if ca_file else None,
        private_key=_read(key_file) if mutual else None,
        certificate_chain=_read(cert_file) if mutual else None,
    )
    return target, credentials, [("grpc.ssl_target_name_override", server_name)]


def check(target: str, service: str, timeout: float, credentials=None, options=()) -> int:
    """The health status number that `target` reports for `service`."""
    if credentials is None:
        channel = grpc.insecure_channel(target, options=list(options))
    else:
        channel = grpc.secure_channel(target, credentials, options=list(options))
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout).status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", choices=SERVICES)
    parser.add_argument("--service", default="", help='health service name ("" is the whole server)')
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--server-name", default="localhost", help="TLS: the name the certificate carries")
    args = parser.parse_args(argv)
    config = importlib.import_module(f"{args.package}.config").parse_args([])
    target, credentials, options = target_and_credentials(config, args.server_name)
    try:
        status = check(target, args.service, args.timeout, credentials, options)
    except grpc.RpcError as exc:
        print(f"{target}: {exc.code().name}", file=sys.stderr)
        return 1
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    print(f"{target}: {name}")
    return 0 if status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
