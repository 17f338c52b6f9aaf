"""The HTTP front's server: Hypercorn (HTTP/1.1 and HTTP/2, h2c or TLS with ALPN) in the orchestrator's
event loop, with the gRPC port's TLS files and message limit."""
from __future__ import annotations

import asyncio
import logging
import socket
import ssl

from gateway.app import create_app
from gateway.options import HttpOptions
from gateway.upstream import Upstream
from serving import security
from serving.atomic_files import write_text_atomic
from serving.server import ServerOptions

log = logging.getLogger(__name__)


class HttpFront:
    """`upstream_target`: the orchestrator's gRPC server as this process reaches it (a private Unix socket in
    production, its loopback port in tests)."""

    def __init__(self, options: HttpOptions, server: ServerOptions, upstream_target: str):
        self.options = options
        self.server = server
        self.upstream = Upstream(upstream_target, server.max_message_bytes)
        self.app = create_app(self.upstream, options.http_cors_origins)
        self.port = -1
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._socket: socket.socket | None = None
        # The gRPC port's files, through the same reload mechanism: every new connection's handshake takes
        # the context built from the current files (a client CA rotated out is refused at once).
        self.tls: security.Reloading[ssl.SSLContext] | None = None
        if server.tls_cert_file:
            files = {"tls-cert-file": server.tls_cert_file, "tls-key-file": server.tls_key_file,
                     "tls-client-ca-file": server.tls_client_ca_file}
            self.tls = security.Reloading("HTTP port", {k: v for k, v in files.items() if v}, self._tls_context)

    def _tls_config(self):
        from hypercorn.config import Config

        config = Config()
        if self.server.tls_cert_file:
            config.certfile = self.server.tls_cert_file
            config.keyfile = self.server.tls_key_file
            if self.server.tls_client_ca_file:  # mutual TLS, as on the gRPC port
                config.ca_certs = self.server.tls_client_ca_file
                config.verify_mode = ssl.CERT_REQUIRED
        return config

    def _tls_context(self) -> ssl.SSLContext:
        """A new context from the current files, as Hypercorn makes it (ALPN h2 and http/1.1, TLS >= 1.2): a
        fresh one each time, since loading a CA into a live context adds to its CAs and never removes one."""
        try:
            return self._tls_config().create_ssl_context()
        except (ssl.SSLError, OSError, ValueError):
            raise security.SecurityConfigError(
                "tls-cert-file / tls-key-file / tls-client-ca-file: not a PEM certificate, its key and CAs") from None

    def _listening_context(self) -> ssl.SSLContext:
        """The context Hypercorn listens with: its handshakes switch to the current files' context (the
        server-name callback runs on every ClientHello, SNI sent or not, before certificates are chosen)."""
        listening = self._tls_context()

        def use_current_files(connection, _server_name, _context) -> None:
            connection.context = self.tls.current()

        listening.sni_callback = use_current_files
        if self.server.tls_client_ca_file:
            # No session resumption with mutual TLS: a resumed session skips the client-certificate check,
            # so a client of a CA rotated out could come back on a session from before. TLS 1.3 resumes only
            # with tickets (none are issued); TLS 1.2 would resume from the server's session cache, which
            # Python cannot turn off: TLS 1.3 only.
            listening.minimum_version = ssl.TLSVersion.TLSv1_3
            listening.num_tickets = 0
        return listening

    def _config(self):
        config = self._tls_config()
        config.bind = [f"fd://{self._socket.fileno()}"]
        config.graceful_timeout = self.server.grace_seconds
        config.accesslog = None
        config.errorlog = logging.getLogger("gateway.hypercorn")
        config.h11_max_incomplete_size = 64 * 1024  # headers only; bodies are limited per route
        if self.tls is not None:
            listening = self._listening_context()
            config.create_ssl_context = lambda: listening
        return config

    async def start(self) -> int:
        from hypercorn.asyncio import serve

        # Bound here, so the port is known (and a taken port fails start-up) before serving begins.
        family = socket.AF_INET6 if ":" in self.server.host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((self.server.host, self.options.http_port))
        self._socket.listen(128)
        self._socket.setblocking(False)
        self.port = self._socket.getsockname()[1]
        self._task = asyncio.create_task(serve(self.app, self._config(), shutdown_trigger=self._stop.wait))
        if self.options.http_port_file:
            write_text_atomic(self.options.http_port_file, f"{self.port}\n")
        log.info("HTTP front on %s:%d (%s)", self.server.host, self.port,
                 "TLS" if self.server.tls_cert_file else "plaintext h2c/HTTP/1.1")
        return self.port

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        if self._socket is not None:
            self._socket.detach()  # Hypercorn adopted the descriptor and has closed it
        await self.upstream.close()
