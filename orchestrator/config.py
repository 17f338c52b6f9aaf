"""The orchestrator's configuration: one frozen dataclass, from flags and I2S_* environment variables."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from orchestrator.pipeline import PipelineLimits
from serving.config import add_server_flags, env_default, server_options
from serving.server import ServerOptions

DEFAULT_PORT = 50050


@dataclass(frozen=True)
class OrchestratorConfig:
    vlm_target: str = "127.0.0.1:50051"  # host:port, or dns:///svc:port for client-side round robin
    audio_target: str = "127.0.0.1:50052"
    default_deadline_seconds: float = 600.0  # when the caller sets none
    max_images_in_flight: int = 8  # per StreamImagesToSound stream
    limits: PipelineLimits = PipelineLimits()
    server: ServerOptions = ServerOptions(port=DEFAULT_PORT)


def parse_args(argv: list[str] | None = None) -> OrchestratorConfig:
    p = argparse.ArgumentParser(prog="python -m orchestrator", description="Image-to-sound orchestrator over gRPC")
    p.add_argument("--vlm", default=env_default("vlm", "127.0.0.1:50051"), help="VLM service target host:port")
    p.add_argument("--audio", default=env_default("audio", "127.0.0.1:50052"), help="audio service target host:port")
    p.add_argument("--default-deadline-seconds", type=float, default=env_default("default_deadline_seconds", 600.0))
    p.add_argument("--max-audio-calls", type=int, default=env_default("max_audio_calls", 8),
                   help="audio requests in flight, all images together")
    p.add_argument("--max-images-in-flight", type=int, default=env_default("max_images_in_flight", 8),
                   help="images processed at once per streaming call")
    add_server_flags(p, DEFAULT_PORT)
    a = p.parse_args(argv)
    return OrchestratorConfig(
        vlm_target=a.vlm, audio_target=a.audio, default_deadline_seconds=a.default_deadline_seconds,
        max_images_in_flight=a.max_images_in_flight, limits=PipelineLimits(max_audio_calls=a.max_audio_calls),
        server=server_options(a),
    )
