"""Start-up and shutdown of a grpc.aio server with standard health, reflection and metrics.

Every service (VLM, audio, orchestrator) runs through `GrpcServer`:
  start() binds the port, health says NOT_SERVING; the caller loads and warms its model, then
  set_serving(True); on SIGTERM/SIGINT: NOT_SERVING, stop(grace), then the caller closes its backend.
"""
from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable, NoReturn, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serving import metrics
from serving.channels import MiB, channel_options
from serving.atomic_files import write_text_atomic
from serving.config import setting
from serving.health import HealthServicer, details_text
from serving.interceptors import standard_interceptors
from serving import security, tracing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerOptions:
    """Network settings common to the three services (flags and environment derived by serving.config)."""

    host: str = setting("127.0.0.1", "address to bind, also for /metrics (0.0.0.0 in a pod)")
    port: int = setting(0, "gRPC port (0: any free port)")
    metrics_port: int = setting(-1, "Prometheus /metrics port (-1: off, 0: any free port)")
    grace_seconds: float = setting(10.0, "on SIGTERM, how long in-flight requests may finish")
    max_message_mb: int = setting(32, "largest gRPC message accepted, in MiB (images up to 20 MB)")
    port_file: str | None = setting(None, "write the bound port to this file once listening (with --port 0)")
    tls_cert_file: str | None = setting(None, "PEM server certificate (chain): serve TLS; re-read when it changes")
    tls_key_file: str | None = setting(None, "PEM private key of --tls-cert-file")
    tls_client_ca_file: str | None = setting(None, "PEM CA of client certificates: require them (mutual TLS)")
    auth_tokens_file: str | None = setting(None, "bearer tokens allowed, one per line (re-read when it changes); "
                                           "every RPC but health then needs 'authorization: Bearer <token>'")
    auth_tokens_env: str | None = setting(None, "name of an environment variable holding allowed bearer tokens "
                                          "(comma-separated), with or instead of --auth-tokens-file")
    reflection: bool = setting(True, "serve gRPC reflection (--no-reflection to hide the API description)")
    health_port: int = setting(-1, "also serve grpc.health.v1 alone, in plaintext, on this port (for Kubernetes "
                               "grpc probes, which cannot speak TLS; -1: off, 0: any free port)")
    telemetry: tracing.TelemetryOptions = tracing.TelemetryOptions()
    max_connection_age_seconds: float = setting(
        300.0, "close each client connection this long after it opened (GOAWAY, with a small random jitter), so clients "
        "reconnect, re-resolve DNS and spread over replicas added since (0: never)")
    max_connection_age_grace_seconds: float = setting(
        600.0, "calls in flight on a connection past its age may finish for this long before it is cut "
        "(covers the orchestrator's default deadline)")
    drain_notice_seconds: float = setting(
        1.0, "on SIGTERM, how long health says NOT_SERVING before new calls are refused, so clients that watch "
        "health send them to other replicas first (skipped when none watches)")
    keepalive_seconds: float = 30.0

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * MiB


def connection_age_options(options: ServerOptions) -> list[tuple[str, int]]:
    """gRPC re-resolves a DNS name only when a connection drops: without a maximum age, replicas added by an
    autoscaler never get calls from clients that are already connected."""
    if options.max_connection_age_seconds <= 0:
        return []
    return [("grpc.max_connection_age_ms", int(options.max_connection_age_seconds * 1000)),
            ("grpc.max_connection_age_grace_ms", int(options.max_connection_age_grace_seconds * 1000))]


class GrpcServer:
    """A grpc.aio server with health and reflection; the service servicers are added by `register`.

    Every RPC passes through OpenTelemetry's interceptor when tracing is on (serving.tracing.setup), the
    standard interceptors (request log, metrics, error mapping), then bearer-token
    authentication when the options ask for it, then `interceptors` in order. The port speaks TLS when
    `credentials` are given or the options name a certificate (reloaded when its files change), else
    plaintext.
    """

    def __init__(
        self,
        options: ServerOptions,
        register: Callable[[grpc.aio.Server], None],
        service_names: Iterable[str],
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        credentials: grpc.ServerCredentials | None = None,
    ):
        self.options = options
        self.service_names = list(service_names)
        # Settings are checked here, before the port opens: a bad certificate or token file ends start-up.
        self.certificates = None
        if credentials is None:
            self.certificates = security.server_certificates(
                options.tls_cert_file, options.tls_key_file, options.tls_client_ca_file)
            credentials = self.certificates.credentials() if self.certificates else None
        self.credentials = credentials
        auth = security.auth_interceptors(options.auth_tokens_file, options.auth_tokens_env)
        self.server = grpc.aio.server(
            interceptors=[*tracing.server_interceptors(), *standard_interceptors(), *auth, *interceptors],
            options=channel_options(options.max_message_bytes, options.keepalive_seconds)
            + connection_age_options(options) + [("grpc.so_reuseport", 0)],
        )
        register(self.server)
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if options.reflection:
            reflection.enable_server_reflection(
                self.service_names + [health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
            )
        # Probes get the same health states on a port of their own: status only, nothing else served there.
        self.health_server = None
        if options.health_port >= 0:
            self.health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
        self.port = 0
        self.health_port = -1
        self.metrics_port = -1

    @property
    def address(self) -> str:
        return f"{self.options.host}:{self.port}"

    async def start(self) -> int:
        """Binds and starts; health is NOT_SERVING until set_serving(True). Returns the bound port."""
        address = f"{self.options.host}:{self.options.port}"
        if self.credentials is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, self.credentials)
        if self.port == 0:
            raise OSError(f"could not bind {self.options.host}:{self.options.port}")
        await self.set_serving(False)
        await self.server.start()
        if self.health_server is not None:
            self.health_port = self.health_server.add_insecure_port(f"{self.options.host}:{self.options.health_port}")
            if self.health_port == 0:
                raise OSError(f"could not bind {self.options.host}:{self.options.health_port}")
            await self.health_server.start()
        self.metrics_port = metrics.serve_metrics(self.options.metrics_port, self.options.host)
        if self.options.port_file:
            write_text_atomic(self.options.port_file, f"{self.port}\n")
        log.info("listening on %s (%s%s; health-only port %s; metrics port %s)", self.address,
                 "plaintext" if self.credentials is None else
                 "mutual TLS" if self.options.tls_client_ca_file else "TLS",
                 ", bearer tokens" if self.options.auth_tokens_file or self.options.auth_tokens_env else "",
                 self.health_port, self.metrics_port)
        return self.port

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:  # "" is the whole server, as Kubernetes probes ask
            await self.health.set(name, status)

    async def stop(self) -> None:
        """NOT_SERVING for all; after the drain notice, let in-flight RPCs finish within the grace period
        (new calls are refused from then on)."""
        watched = self.health.watching
        await self.health.enter_graceful_shutdown()
        if watched and self.options.drain_notice_seconds > 0:
            await asyncio.sleep(self.options.drain_notice_seconds)  # a notice period, not a synchronisation
        await self.server.stop(self.options.grace_seconds)
        if self.health_server is not None:  # after the drain: probes see NOT_SERVING meanwhile
            await self.health_server.stop(0)


def install_signal_handlers(stop: asyncio.Event) -> None:
    """SIGTERM (Kubernetes) and SIGINT (Ctrl-C) set `stop`; SIGHUP re-reads certificate and token files
    (they are also re-read when they change)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, security.reload_all)


async def run_until_signal(
    server: GrpcServer,
    become_ready: Callable[[], Awaitable[None]],
    close: Callable[[], Awaitable[None]],
) -> None:
    """The life of a service: start NOT_SERVING, `become_ready` (load and warm a model, or wait for the
    model services), SERVING, wait for SIGTERM/SIGINT, then NOT_SERVING, drain, close. The port is open
    (saying NOT_SERVING) while loading, so probes see progress rather than a refused connection."""
    stop = asyncio.Event()
    install_signal_handlers(stop)
    await server.start()
    readying = asyncio.create_task(become_ready())
    waiter = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({readying, waiter}, return_when=asyncio.FIRST_COMPLETED)
    try:
        if readying in done:
            readying.result()  # a failed load ends the process with its error
            await server.set_serving(True)
            details = details_text()  # e.g. which path serves the model (serving.fast_path)
            log.info("SERVING on %s%s", server.address, f" ({details})" if details else "")
            await waiter
        log.info("shutting down")
    finally:
        waiter.cancel()
        still_loading = not readying.done()
        readying.cancel()
        await server.stop()
        if still_loading:
            # A loading thread cannot be interrupted; closing the model under it would race. The process
            # exits once the thread returns.
            log.warning("stopped while still loading the model")
        else:
            await close()


def serve_model_service(name: str, kind: str, config: Any, *, in_process_backend: str,
                        build_backend: Callable, make_server: Callable, load_and_warm: Callable) -> None:
    """A model service's process once its flags are parsed: the usual mistakes (a model folder typo, the two
    model folders swapped, a port in use, a cache URL that is malformed or does not answer) end here in one
    line, then torch's threads, the log format and
    tracing are set, then it serves until SIGTERM. `kind` is serving.startup's VLM or AUDIO;
    `in_process_backend` the backend whose model folder is checked (not Triton's)."""
    import inspect

    from serving.startup import check_model_folder, prepare_process
    from serving.threads import apply_torch_threads

    from serving.result_cache import check_options

    if config.backend == in_process_backend:
        check_model_folder(config.model, kind)
    check_options(config.cache)  # a malformed --cache-url, or a Redis that does not answer: one line
    prepare_process(name, config.server)
    apply_torch_threads(config.threads)  # before the model loads: its threads are sized by then

    async def serve() -> None:
        backend = build_backend(config)  # cheap: loads nothing until load_and_warm
        server, servicer = make_server(config, backend)  # grpc.aio objects belong to the running loop

        async def close() -> None:
            closed = servicer.close()
            if inspect.isawaitable(closed):
                await closed
            backend.close()

        await run_until_signal(server, lambda: asyncio.to_thread(load_and_warm, backend), close)

    asyncio.run(serve())
    leave_after_orderly_shutdown()


def leave_after_orderly_shutdown() -> NoReturn:
    """End a model service whose servers have stopped and whose backend is closed: export the buffered spans,
    flush the logs, and exit without the interpreter's teardown, which spends ~0.7-1 s of CPU taking torch,
    transformers and diffusers apart module by module for memory the OS takes back anyway (it held up every
    embedded run's exit, and a pod's). An error or a signal before this point exits the ordinary way."""
    import os
    import sys

    tracing.shutdown()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)
