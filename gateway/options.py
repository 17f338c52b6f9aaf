"""Settings of the HTTP front (flattened into the orchestrator's flags and I2S_ORCHESTRATOR_* variables)."""
from __future__ import annotations

from dataclasses import dataclass

from serving.config import setting


@dataclass(frozen=True)
class HttpOptions:
    http_port: int = setting(-1, "HTTP/1.1 + HTTP/2 port for Connect, gRPC-Web, JSON lines and the page at / "
                             "(-1: off, 0: any free port); TLS, tokens and limits are the gRPC port's")
    http_port_file: str | None = setting(None, "write the bound HTTP port to this file once listening")
    http_cors_origins: str = setting("", "comma-separated origins allowed to call the API from other sites' "
                                     "pages (CORS); empty: CORS off, only the page served here")
