"""`python -m orchestrator --http-port` as a process, with mutual TLS and bearer tokens: the HTTP front
serves HTTP/2 over the gRPC port's TLS (and asks for the same client certificates), and its calls reach the
gRPC server through the process's private socket, where the token check and error mapping happen.
The model services are not running: enough to see refusals and the mapped UNAVAILABLE, no models needed."""
from __future__ import annotations

import asyncio
import base64
import os
import signal
import ssl
import subprocess
import sys
import time

import httpx
import pytest

from tests.real_stack import png
from tests.security.pki import CertificateAuthority

pytestmark = pytest.mark.e2e
TOKEN = "process-http-token"
START_TIMEOUT = 60


@pytest.fixture(scope="module")
def orchestrator_process(tmp_path_factory):
    folder = tmp_path_factory.mktemp("http-front")
    ca = CertificateAuthority(folder, "ca")
    server, client = ca.issue("server", server=True), ca.issue("client", server=False)
    (folder / "tokens").write_text(f"{TOKEN}\n")
    port_file = folder / "http-port"
    log = open(folder / "log", "wb")
    (folder / "tmp").mkdir()  # the process's TMPDIR: where its private socket folder is made
    process = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "--vlm", "127.0.0.1:1", "--audio", "127.0.0.1:2", "--host", "127.0.0.1",
         "--port", "0", "--http-port", "0", "--http-port-file", str(port_file), "--tls-cert-file", str(server.cert),
         "--tls-key-file", str(server.key), "--tls-client-ca-file", str(ca.cert_file),
         "--auth-tokens-file", str(folder / "tokens"), "--http-tls-check-seconds", "0.2"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "TMPDIR": str(folder / "tmp")})
    try:
        give_up = time.monotonic() + START_TIMEOUT
        while not (port_file.exists() and port_file.read_text().strip()):
            assert process.poll() is None, (folder / "log").read_text()
            assert time.monotonic() < give_up, "no HTTP port file"
            time.sleep(0.05)  # polling a file the child writes: there is nothing to wait on
        assert [p.name for p in (folder / "tmp").iterdir()][0].startswith("i2s-orchestrator-")
        context = ssl.create_default_context(cafile=str(ca.cert_file))
        context.load_cert_chain(str(client.cert), str(client.key))
        yield process, f"https://127.0.0.1:{int(port_file.read_text())}", context, str(ca.cert_file), folder
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        log.close()


async def test_page_over_http2_with_the_grpc_ports_tls(orchestrator_process):
    _, base, context, ca_file, _ = orchestrator_process
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
    _, base, context, _, _ = orchestrator_process
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
    _, base, context, _, folder = orchestrator_process
    new_ca = CertificateAuthority(folder / "next", "ca-next")
    issued = new_ca.issue("server", server=True)
    # As a Secret volume updates: each file replaced whole (the key first: the half-rotated pair is refused).
    os.replace(issued.key, folder / "server.key")
    os.replace(issued.cert, folder / "server.crt")
    trusting_new = ssl.create_default_context(cafile=str(new_ca.cert_file))
    trusting_new.load_cert_chain(str(folder / "client.crt"), str(folder / "client.key"))  # still the old CA's client
    give_up = time.monotonic() + START_TIMEOUT
    while True:  # until the next check loads the files (every 0.2 s here); bounded
        try:
            async with httpx.AsyncClient(http2=True, verify=trusting_new, timeout=5) as client:
                response = await client.get(base + "/")
            break
        except httpx.ConnectError:
            assert time.monotonic() < give_up, "the HTTP port never served the new certificate"
            await asyncio.sleep(0.1)  # polling a reload that has no event to wait on
    assert response.status_code == 200 and response.http_version == "HTTP/2"


async def test_sigterm_stops_both_ports_and_removes_the_private_socket(orchestrator_process):
    process, base, context, _, folder = orchestrator_process
    process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(process.wait, 60) == 0
    log = (folder / "log").read_text()
    assert "Traceback" not in log, log[-3000:]
    assert list((folder / "tmp").iterdir()) == []  # the private socket's folder is gone
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient(verify=context, timeout=5) as client:
            await client.get(base + "/")
