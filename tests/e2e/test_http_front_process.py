"""`python -m orchestrator --http-port` as a process, with mutual TLS and bearer tokens: the HTTP front
serves HTTP/2 over the gRPC port's TLS (and asks for the same client certificates), and its calls reach the
gRPC server through the process's private socket, where the token check and error mapping happen.
The model services are not running: enough to see refusals and the mapped UNAVAILABLE, no models needed."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import signal
import socket
import ssl
import re
import subprocess
import sys
import threading

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving import security

from tests.real_stack import png
from tests.security.pki import CertificateAuthority

pytestmark = pytest.mark.e2e
TOKEN = "process-http-token"
START_TIMEOUT = 60


class ProcessOutput:
    """Reads the child's log lines as it writes them (a thread on its stdout pipe), keeps them in a file, and
    lets the test wait for a line: synchronising on what the process says, not on time."""

    def __init__(self, process: subprocess.Popen, log_path):
        self.lines: list[str] = []
        self.ended = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(process, log_path), daemon=True)
        self._thread.start()

    def _read(self, process, log_path) -> None:
        with open(log_path, "w") as log:
            for line in process.stdout:
                log.write(line)
                log.flush()
                with self._changed:
                    self.lines.append(line)
                    self._changed.notify_all()
        with self._changed:
            self.ended = True
            self._changed.notify_all()

    def join(self, timeout: float = 30) -> None:
        """Until the child's output has ended (its pipe closes when it exits)."""
        self._thread.join(timeout)

    def wait_for(self, pattern: str, after: int = 0, timeout: float = START_TIMEOUT) -> re.Match:
        """The first line from index `after` on that matches `pattern`; fails if the process ends first."""
        def found():
            return next((m for m in map(re.compile(pattern).search, self.lines[after:]) if m), None)

        with self._changed:
            assert self._changed.wait_for(lambda: found() or self.ended, timeout), f"no line like {pattern!r}"
            match = found()
        assert match, f"the process ended without a line like {pattern!r}:\n{''.join(self.lines)[-3000:]}"
        return match


@contextlib.contextmanager
def orchestrator_with_http(folder, server, client_ca_file):
    """`python -m orchestrator` with mutual TLS on both ports (the model services are not running); yields the
    process, its output, the HTTP port's base URL and the gRPC port's target, once both listen."""
    (folder / "tokens").write_text(f"{TOKEN}\n")
    port_file = folder / "http-port"
    (folder / "tmp").mkdir()  # the process's TMPDIR: where its private socket folder is made
    process = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "--vlm", "127.0.0.1:1", "--audio", "127.0.0.1:2", "--host", "127.0.0.1",
         "--port", "0", "--http-port", "0", "--http-port-file", str(port_file), "--tls-cert-file", str(server.cert),
         "--tls-key-file", str(server.key), "--tls-client-ca-file", str(client_ca_file),
         "--auth-tokens-file", str(folder / "tokens")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, "TMPDIR": str(folder / "tmp")})
    output = ProcessOutput(process, folder / "log")
    try:
        grpc_port = output.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1)
        port = output.wait_for(r"HTTP front on 127\.0\.0\.1:(\d+)").group(1)  # logged after the port file is written
        assert port_file.read_text().strip() == port
        yield process, output, f"https://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def orchestrator_process(tmp_path_factory):
    folder = tmp_path_factory.mktemp("http-front")
    ca = CertificateAuthority(folder, "ca")
    server, client = ca.issue("server", server=True), ca.issue("client", server=False)
    with orchestrator_with_http(folder, server, ca.cert_file) as (process, output, base, _):
        assert [p.name for p in (folder / "tmp").iterdir()][0].startswith("i2s-orchestrator-")
        yield process, base, client_context(ca.cert_file, client), str(ca.cert_file), folder, output


def client_context(ca_file, client) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_file))
    context.load_cert_chain(str(client.cert), str(client.key))
    return context


async def test_page_over_http2_with_the_grpc_ports_tls(orchestrator_process):
    _, base, context, ca_file, _, _ = orchestrator_process
    async with httpx.AsyncClient(http2=True, verify=context, timeout=30) as client:
        page = await client.get(base + "/")
        module = await client.get(base + "/static/app.js")
    assert page.status_code == 200 and page.http_version == "HTTP/2" and "<title>Image to sound" in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert module.status_code == 200 and "javascript" in module.headers["content-type"]
    assert "access-control-allow-origin" not in page.headers  # CORS off unless configured
    # Mutual TLS, as on the gRPC port: no client certificate, no connection.
    with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=ca_file), timeout=30) as client:
            await client.get(base + "/")


async def test_calls_go_through_the_grpc_servers_token_check_and_error_mapping(orchestrator_process):
    _, base, context, _, _, _ = orchestrator_process
    body = '{"image": {"data": "%s"}, "options": {"skipAudio": true}}' % base64.b64encode(png()).decode()
    async with httpx.AsyncClient(http2=True, verify=context, timeout=30) as client:
        refused = await client.post(base + "/v1/image-to-sound", content=body,
                                    headers={"content-type": "application/json"})
        unavailable = await client.post(base + "/v1/image-to-sound", content=body, headers={
            "content-type": "application/json", "authorization": f"Bearer {TOKEN}"})
    assert refused.status_code == 401 and refused.json()["code"] == "unauthenticated"
    # With the token the request passes validation and admission; the VLM is not there: UNAVAILABLE, 503.
    assert unavailable.status_code == 503 and unavailable.json()["code"] == "unavailable"
    assert "Traceback" not in unavailable.text and len(unavailable.text) < 1000


async def test_a_rotated_certificate_is_served_without_a_restart(orchestrator_process):
    _, base, context, _, folder, output = orchestrator_process
    seen = len(output.lines)
    new_ca = CertificateAuthority(folder / "next", "ca-next")
    issued = new_ca.issue("server", server=True)
    # As a Secret volume updates: each file replaced whole (the key first: the half-rotated pair is refused).
    os.replace(issued.key, folder / "server.key")
    os.replace(issued.cert, folder / "server.crt")
    trusting_new = ssl.create_default_context(cafile=str(new_ca.cert_file))
    trusting_new.load_cert_chain(str(folder / "client.crt"), str(folder / "client.key"))  # still the old CA's client
    # The next connection's handshake reads the files again: no waiting for a check.
    async with httpx.AsyncClient(http2=True, verify=trusting_new, timeout=5) as client:
        response = await client.get(base + "/")
    assert response.status_code == 200 and response.http_version == "HTTP/2"
    await asyncio.to_thread(output.wait_for, "HTTP port: TLS files reloaded", seen)


async def _http_status(base: str, context: ssl.SSLContext) -> int | None:
    """The page's status over the HTTP port, or None when the TLS handshake is refused."""
    try:
        async with httpx.AsyncClient(http2=True, verify=context, timeout=30) as client:
            return (await client.get(base + "/")).status_code
    except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
        return None


def _page_status_resuming(base: str, context: ssl.SSLContext, session: ssl.SSLSession | None = None):
    """GET / over HTTP/1.1 on a TLS socket that offers to resume `session`: (status or None when refused,
    the connection's session, whether it was resumed)."""
    host, port = base.removeprefix("https://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as raw:
        try:
            with context.wrap_socket(raw, server_hostname=host, session=session) as tls:
                tls.sendall(b"GET / HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")
                head = b""
                while b"\r\n" not in head and (part := tls.recv(256)):
                    head += part
                status = int(head.split()[1]) if head.startswith(b"HTTP/1.1 ") else None
                return status, tls.session, tls.session_reused
        except (ssl.SSLError, OSError):
            return None, None, False


def _grpc_port_resuming(target: str, context: ssl.SSLContext, session: ssl.SSLSession | None = None):
    """A TLS handshake on the gRPC port (ALPN h2) that offers to resume `session`, then HTTP/2's client preface:
    (whether the server answered with its SETTINGS frame, the connection's session, whether it was resumed)."""
    host, port = target.rsplit(":", 1)
    context.set_alpn_protocols(["h2"])
    with socket.create_connection((host, int(port)), timeout=30) as raw:
        try:
            with context.wrap_socket(raw, server_hostname=host, session=session) as tls:
                tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
                frame = b""
                while len(frame) < 9 and (part := tls.recv(9 - len(frame))):
                    frame += part
                return len(frame) == 9 and frame[3] == 4, tls.session, tls.session_reused
        except (ssl.SSLError, OSError):
            return False, None, False


async def _grpc_status(target: str, ca_file, client) -> str:
    """Health over the gRPC port on a new channel (a new handshake): the status, or the refusal's code."""
    credentials = security.client_credentials(str(ca_file), str(client.cert), str(client.key))
    async with grpc.aio.secure_channel(target, credentials) as channel:
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


async def test_a_client_ca_rotated_out_is_refused_on_both_ports_without_a_restart(tmp_path):
    ca1, ca2 = CertificateAuthority(tmp_path / "ca1", "ca1"), CertificateAuthority(tmp_path / "ca2", "ca2")
    server = ca1.issue("server", server=True)
    client1, client2 = ca1.issue("client1", server=False), ca2.issue("client2", server=False)
    from_ca1, from_ca2 = client_context(ca1.cert_file, client1), client_context(ca1.cert_file, client2)
    client_ca = tmp_path / "client-ca.pem"
    shutil.copy(ca1.cert_file, client_ca)

    def rotate(content: bytes) -> None:  # the whole file replaced at once, as a Secret volume updates
        (tmp_path / "client-ca.next").write_bytes(content)
        os.replace(tmp_path / "client-ca.next", client_ca)

    with orchestrator_with_http(tmp_path, server, client_ca) as (_, output, base, target):
        accepted_health = await _grpc_status(target, ca1.cert_file, client1)
        assert accepted_health in ("SERVING", "NOT_SERVING")  # an answer: the handshake was accepted
        assert await _http_status(base, from_ca1) == 200
        assert await _http_status(base, from_ca2) is None
        assert await _grpc_status(target, ca1.cert_file, client2) == "UNAVAILABLE"
        raw_ca1 = client_context(ca1.cert_file, client1)  # HTTP/1.1 (httpx sets ALPN h2 on its contexts)
        status, session, _ = await asyncio.to_thread(_page_status_resuming, base, raw_ca1)
        assert status == 200
        # The gRPC port resumes sessions (TLS 1.3 tickets, TLS 1.2 too): the probe below can see a resumption.
        grpc_sessions = {}
        for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
            context = client_context(ca1.cert_file, client1)
            context.maximum_version = version
            answered, grpc_session, _ = await asyncio.to_thread(_grpc_port_resuming, target, context)
            assert answered
            assert (await asyncio.to_thread(_grpc_port_resuming, target, context, grpc_session))[::2] == (True, True)
            grpc_sessions[version] = context, grpc_session
        # Mutual TLS on the HTTP port is TLS 1.3 without resumption (a resumed TLS 1.2 session, from the
        # server's cache that Python cannot turn off, would skip the client-certificate check).
        tls12 = client_context(ca1.cert_file, client1)
        tls12.maximum_version = ssl.TLSVersion.TLSv1_2
        assert await _http_status(base, tls12) is None

        # Half a rotation (the new CA file cut short): unusable, so both ports keep the previous files.
        seen = len(output.lines)
        rotate(ca2.cert_file.read_bytes()[:60])
        assert await _http_status(base, from_ca1) == 200
        assert await _grpc_status(target, ca1.cert_file, client1) == accepted_health
        await asyncio.to_thread(output.wait_for, "HTTP port: TLS files changed but are unusable", seen)
        await asyncio.to_thread(output.wait_for, "gRPC port: TLS files changed but are unusable", seen)

        # CA 1 rotated out, CA 2 in: without a restart, the next handshakes refuse CA 1's client and accept CA 2's.
        seen = len(output.lines)
        rotate(ca2.cert_file.read_bytes())
        assert await _http_status(base, from_ca1) is None
        assert await _http_status(base, from_ca2) == 200
        # Nor does CA 1's client get back in on its session from before the rotation.
        status, _, resumed = await asyncio.to_thread(_page_status_resuming, base, raw_ca1, session)
        assert status is None and not resumed
        # Nor on the gRPC port, TLS 1.3 or 1.2: the reload gives gRPC a new TLS context, which knows no
        # session from before it (measured here; grpc's Python API has no setting for its sessions).
        for context, grpc_session in grpc_sessions.values():
            answered, _, resumed = await asyncio.to_thread(_grpc_port_resuming, target, context, grpc_session)
            assert not answered and not resumed
        assert await _grpc_status(target, ca1.cert_file, client1) == "UNAVAILABLE"
        assert await _grpc_status(target, ca1.cert_file, client2) == accepted_health
        await asyncio.to_thread(output.wait_for, "HTTP port: TLS files reloaded", seen)
        await asyncio.to_thread(output.wait_for, "gRPC port: TLS files reloaded", seen)


async def test_sigterm_stops_both_ports_and_removes_the_private_socket(orchestrator_process):
    process, base, context, _, folder, output = orchestrator_process
    process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(process.wait, 60) == 0
    output.join()
    log = "".join(output.lines)
    assert "Traceback" not in log, log[-3000:]
    assert list((folder / "tmp").iterdir()) == []  # the private socket's folder is gone
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient(verify=context, timeout=5) as client:
            await client.get(base + "/")
