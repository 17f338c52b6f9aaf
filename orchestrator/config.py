"""The orchestrator's configuration: one frozen dataclass; flags and I2S_ORCHESTRATOR_* variables derive from it."""
from __future__ import annotations

from dataclasses import dataclass

from gateway.options import HttpOptions
from orchestrator.pipeline import PipelineLimits
from serving.config import parse_config, setting
from serving.deadline import DEFAULT_DEADLINE_SECONDS
from serving.priority import PriorityOptions
from serving.server import ServerOptions

DEFAULT_PORT = 50050
ENV_PREFIX = "ORCHESTRATOR"


@dataclass(frozen=True)
class OrchestratorConfig:
    vlm_target: str = setting("127.0.0.1:50051", "VLM service target: host:port, or dns:///svc:port for "
                              "client-side round robin over replicas", flag="vlm")
    audio_target: str = setting("127.0.0.1:50052", "audio service target (as --vlm)", flag="audio")
    default_deadline_seconds: float = setting(DEFAULT_DEADLINE_SECONDS, "deadline of a request whose caller sets none")
    max_images_in_flight: int = setting(8, "images of one streaming call in work (running or waiting for a slot); "
                                        "the stream is not read further meanwhile")
    max_images_total: int = setting(16, "images processed at once, all calls together (keep <= the VLM's queue)")
    max_images_waiting: int = setting(128, "images waiting for a slot (each holds its image in memory) before "
                                    "RESOURCE_EXHAUSTED at once")
    admission_wait_seconds: float = setting(60.0, "longest wait for an image slot before RESOURCE_EXHAUSTED")
    overloaded_retries: int = setting(3, "retries (with backoff) of a model call refused RESOURCE_EXHAUSTED "
                                      "before it produced anything")
    downstream_tls_ca_file: str | None = setting(None, "PEM CA of the model services' certificates: call them over TLS")
    downstream_tls_cert_file: str | None = setting(None, "PEM client certificate for the model services (mutual TLS)")
    downstream_tls_key_file: str | None = setting(None, "PEM private key of --downstream-tls-cert-file")
    downstream_token_file: str | None = setting(None, "bearer token for the model services (first line; re-read "
                                                "when it changes)")
    downstream_tls_check_seconds: float = setting(30.0, "how often the downstream TLS files are checked for "
                                                  "changes; new channels use the new files (0: never)")
    channel_close_grace_seconds: float = setting(60.0, "how long calls in flight on channels replaced after a TLS "
                                                 "file change may go on before those channels close")
    audio_limits_refresh_seconds: float = setting(60.0, "how often the audio service is asked what it makes "
                                                  "(longest clip, speech/music guard), which the orchestrator "
                                                  "checks requests against at its edge (0: asked once, at start)")
    limits: PipelineLimits = PipelineLimits()
    priority: PriorityOptions = PriorityOptions()
    server: ServerOptions = ServerOptions(port=DEFAULT_PORT)
    http: HttpOptions = HttpOptions()


def parse_args(argv: list[str] | None = None) -> OrchestratorConfig:
    return parse_config(OrchestratorConfig, argv, prefix=ENV_PREFIX, prog="python -m orchestrator",
                        description="Image-to-sound orchestrator over gRPC")
