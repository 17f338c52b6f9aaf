"""What both model services' Triton backends share on the client side: clients made with the current TLS
files, readiness that follows Triton's model state, and Triton's errors translated into the domain errors
(tritonclient is imported lazily)."""
from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from serving import security
from serving.config import setting
from serving.deadline import Deadline
from serving.errors import NotReady

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TritonTls:
    """TLS towards Triton's gRPC port (Triton's --grpc-use-ssl, --grpc-use-ssl-mutual)."""

    triton_ca_file: str | None = setting(None, "PEM CA of Triton's gRPC certificate: call Triton over TLS")
    triton_cert_file: str | None = setting(None, "PEM client certificate for Triton (with --grpc-use-ssl-mutual)")
    triton_key_file: str | None = setting(None, "PEM private key of --triton-cert-file")

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments of tritonclient.grpc.InferenceServerClient (it reads the files when created);
        for tools and tests: the backends use `TritonClients`, which follows the files as they change."""
        if not self.triton_ca_file:
            return {}
        return {"ssl": True, "root_certificates": self.triton_ca_file, "private_key": self.triton_key_file,
                "certificate_chain": self.triton_cert_file}


class TritonClients:
    """tritonclient gRPC clients towards one Triton, made with the current TLS files (`security.Reloading`,
    the project's one reload mechanism): a rotated client certificate is used from the next call on, no
    restart. `shared()` is the client for unary calls, replaced by a new one once the files changed (a
    replaced client closes when the last call holding it lets it go: tritonclient closes on deletion, so
    a caller keeps the client it got for the whole call); `new_aio()` is an aio one of its own (for a stream)."""

    def __init__(self, url: str, tls: TritonTls, what: str):
        self.url = url
        self.credentials = security.reloading_client_credentials(
            what, tls.triton_ca_file, tls.triton_cert_file, tls.triton_key_file) if tls.triton_ca_file else None
        self._shared: Any = None
        self._shared_credentials: Any = None
        self._lock = threading.Lock()

    def _current(self):
        return self.credentials.current() if self.credentials is not None else None

    def new_aio(self):
        """An aio client of its own, for a stream on the event loop that makes it."""
        import tritonclient.grpc.aio as triton

        return triton.InferenceServerClient(self.url, creds=self._current())

    def shared(self):
        credentials = self._current()
        with self._lock:
            if self._shared is None or credentials is not self._shared_credentials:
                import tritonclient.grpc as triton

                self._shared = triton.InferenceServerClient(self.url, creds=credentials)
                self._shared_credentials = credentials
            return self._shared

    def close(self) -> None:
        with self._lock:
            shared, self._shared = self._shared, None
        if shared is not None:
            shared.close()


def translate_error(error: Exception) -> Exception:
    """A tritonclient (or gRPC) error -> the backend interfaces' exceptions (DEADLINE_EXCEEDED, INVALID_ARGUMENT,
    UNAVAILABLE for a model that is down or unknown; anything else stays internal)."""
    import grpc
    from tritonclient.utils import InferenceServerException

    if isinstance(error, InferenceServerException):
        status, message = error.status(), error.message()
    elif isinstance(error, grpc.RpcError) and hasattr(error, "code"):  # a streaming call's own end
        status, message = str(error.code()), error.details() or ""
    else:
        status, message = None, str(error)
    if status and "DEADLINE_EXCEEDED" in status:
        return TimeoutError(f"Triton: {message}")
    if status and "INVALID_ARGUMENT" in status:
        return ValueError(f"Triton: {message}")
    if status and "UNAVAILABLE" in status or "not ready" in message.lower() or "unknown model" in message.lower():
        return NotReady(f"Triton: {message}")
    return RuntimeError(f"Triton: {message}")


def call_timeout(deadline: Deadline | None, default_seconds: float | None) -> float | None:
    """A Triton call's timeout: what is left of the caller's deadline (a passed one still makes a call that
    times out at once, so the caller hears Triton's DEADLINE_EXCEEDED), else `default_seconds`."""
    remaining = deadline.remaining() if deadline is not None else None
    return default_seconds if remaining is None else max(0.001, remaining)


class Readiness:
    """The last readiness answer, reused for `ttl_seconds`: the servicer asks before every request, from
    its event loop, and a gRPC round trip per request (up to its timeout when Triton hangs) is too much."""

    def __init__(self, ttl_seconds: float):
        self.ttl_seconds = ttl_seconds
        self._value, self._at = False, -math.inf

    def check(self, ask: Callable[[], bool]) -> bool:
        now = time.monotonic()
        if now - self._at >= self.ttl_seconds:
            self._value, self._at = ask(), now
        return self._value


def model_ready(client, model_name: str, timeout_seconds: float = 0.5) -> bool:
    """Triton's server-ready and model-ready calls; any failure (down, unknown model) reads as not ready."""
    try:
        return bool(client.is_server_ready(client_timeout=timeout_seconds)
                    and client.is_model_ready(model_name, client_timeout=timeout_seconds))
    except Exception:  # noqa: BLE001 - unreachable or refusing: not ready, which is all we report
        return False


def wait_model_ready(client, model_name: str, timeout_seconds: float, retry_seconds: float = 0.5) -> None:
    """Bounded retry loop on Triton's readiness calls (Triton may still be loading the model)."""
    deadline = time.monotonic() + timeout_seconds
    while not model_ready(client, model_name):
        if time.monotonic() > deadline:
            raise NotReady(f"Triton model {model_name!r} not ready after {timeout_seconds:.0f} s")
        time.sleep(retry_seconds)  # back-off between calls, not synchronisation
    log.info("Triton model %s is ready", model_name)


# -- inside Triton: what both Python-backend models of deploy/triton read from their arguments --------

def model_parameters(model_config: dict) -> dict[str, str]:
    """The `parameters { key: ... value: { string_value: ... } }` of a model's config.pbtxt, as a dict."""
    return {key: value.get("string_value", "") for key, value in model_config.get("parameters", {}).items()}


def instance_device(args: dict) -> str:
    """The device of a Triton model instance: KIND_GPU instances run on their own GPU, KIND_CPU on the CPU."""
    return f"cuda:{args['model_instance_device_id']}" if args["model_instance_kind"] == "GPU" else "cpu"
