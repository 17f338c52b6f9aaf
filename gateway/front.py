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
        self._tls_watcher: asyncio.Task | None = None
        self._socket: socket.socket | None = None
        self._ssl_context: ssl.SSLContext | None = None
        self._tls_files = None
        if server.tls_cert_file:
            files = {"tls-cert-file": server.tls_cert_file, "tls-key-file": server.tls_key_file}
            if server.tls_client_ca_file:
                files["tls-client-ca-file"] = server.tls_client_ca_file
            self._tls_files = security.watch_files(files)  # SIGHUP invalidates it too
            self._tls_files.changed()

    def _config(self):
        from hypercorn.config import Config

        front = self

        class KeptContext(Config):
            # Hypercorn builds its SSL context once; kept here so rotated files can be loaded into it.
            def create_ssl_context(self):
                front._ssl_context = super().create_ssl_context()
                return front._ssl_context

        config = KeptContext()
        config.bind = [f"fd://{self._socket.fileno()}"]
        config.graceful_timeout = self.server.grace_seconds
        config.accesslog = None
        config.errorlog = logging.getLogger("gateway.hypercorn")
        config.h11_max_incomplete_size = 64 * 1024  # headers only; bodies are limited per route
        if self.server.tls_cert_file:
            config.certfile = self.server.tls_cert_file
            config.keyfile = self.server.tls_key_file
            if self.server.tls_client_ca_file:  # mutual TLS, as on the gRPC port
                config.ca_certs = self.server.tls_client_ca_file
                config.verify_mode = ssl.CERT_REQUIRED
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
        if self._tls_files is not None and self.options.http_tls_check_seconds > 0:
            self._tls_watcher = asyncio.create_task(self._watch_tls_files())
        if self.options.http_port_file:
            write_text_atomic(self.options.http_port_file, f"{self.port}\n")
        log.info("HTTP front on %s:%d (%s)", self.server.host, self.port,
                 "TLS" if self.server.tls_cert_file else "plaintext h2c/HTTP/1.1")
        return self.port

    def reload_tls(self) -> bool:
        """Loads changed TLS files into the live context: new handshakes use them. Unusable files (a rotation
        half done) keep the current certificate. Returns whether it reloaded."""
        if self._tls_files is None or self._ssl_context is None or not self._tls_files.changed():
            return False
        cert, key, ca = self.server.tls_cert_file, self.server.tls_key_file, self.server.tls_client_ca_file
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)  # a dry run first
            self._ssl_context.load_cert_chain(cert, key)
            if ca:
                self._ssl_context.load_verify_locations(ca)
        except (ssl.SSLError, OSError, ValueError):
            log.warning("TLS files changed but are unusable; the HTTP port keeps the previous certificate")
            return False
        log.info("HTTP port: TLS certificate reloaded")
        return True

    async def _watch_tls_files(self) -> None:
        while True:
            await asyncio.sleep(self.options.http_tls_check_seconds)  # polling files, not synchronising
            self.reload_tls()

    async def stop(self) -> None:
        if self._tls_watcher is not None:
            self._tls_watcher.cancel()
            await asyncio.gather(self._tls_watcher, return_exceptions=True)
        self._stop.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        if self._socket is not None:
            self._socket.detach()  # Hypercorn adopted the descriptor and has closed it
        await self.upstream.close()
