"""The HTTP front's app without the services: what it refuses before forwarding anything (media type, size,
malformed JSON), its security headers, and CORS only when configured. (With the services: the
integration and e2e tests.)"""
from __future__ import annotations

import httpx
import pytest
import pytest_asyncio

from gateway.app import create_app
from gateway.upstream import Upstream

LIMIT = 1024 * 1024


@pytest_asyncio.fixture
async def client_for():
    upstreams = []

    def make(cors: str = "") -> httpx.AsyncClient:
        upstream = Upstream("127.0.0.1:1", LIMIT)  # nothing listens: a forwarded call would fail UNAVAILABLE
        upstreams.append(upstream)
        return httpx.AsyncClient(transport=httpx.ASGITransport(create_app(upstream, cors)), base_url="http://front")

    yield make
    for upstream in upstreams:
        await upstream.close()


async def test_page_and_modules_come_with_the_content_security_policy(client_for):
    client = client_for()
    for path in ("/", "/static/app.js", "/static/style.css"):
        response = await client.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-security-policy"].startswith("default-src 'none'")
        assert response.headers["x-content-type-options"] == "nosniff"
    assert "script-src 'self'" in (await client.get("/")).headers["content-security-policy"]
    assert (await client.get("/static/%2e%2e/app.py")).status_code == 404


@pytest.mark.parametrize("content_type, body, status, code", [
    ("text/plain", b"{}", 415, None),
    ("application/json", b'{"image": ', 400, "invalid_argument"),
    ("application/json", b'{"image": {"data": 5}}', 400, "invalid_argument"),
    ("application/json", b'{"no_such_field": 1}', 400, "invalid_argument"),
    ("application/json", b'{"image": {"data": "' + b"A" * (2 * LIMIT) + b'"}}', 413, "resource_exhausted"),
])
async def test_refused_before_forwarding_with_a_bounded_message(client_for, content_type, body, status, code):
    response = await client_for().post("/v1/image-to-sound", content=body, headers={"content-type": content_type})
    assert response.status_code == status
    if code:
        assert response.json()["code"] == code
        assert 0 < len(response.json()["message"]) <= 500 and "Traceback" not in response.text


async def test_a_bad_deadline_header_is_invalid_argument(client_for):
    response = await client_for().post("/v1/image-to-sound", content=b'{"image": {"data": "AAAA"}}',
                                 headers={"content-type": "application/json", "connect-timeout-ms": "soon"})
    assert response.status_code == 400 and response.json()["code"] == "invalid_argument"


async def test_cors_is_off_unless_origins_are_configured(client_for):
    preflight = {"origin": "https://app.example", "access-control-request-method": "POST",
                 "access-control-request-headers": "content-type"}
    off = await client_for().options("/v1/image-to-sound", headers=preflight)
    assert "access-control-allow-origin" not in off.headers
    on = await client_for("https://app.example").options("/v1/image-to-sound", headers=preflight)
    assert on.status_code == 200 and on.headers["access-control-allow-origin"] == "https://app.example"
    other = await client_for("https://app.example").options("/v1/image-to-sound",
                                                       headers={**preflight, "origin": "https://evil.example"})
    assert other.headers.get("access-control-allow-origin") != "https://evil.example"


async def test_readiness_says_not_serving_when_nothing_answers_and_refuses_a_bad_wait(client_for):
    client = client_for()
    response = await client.get("/v1/ready")  # nothing listens upstream: not serving, at once
    assert response.status_code == 200 and response.json() == {"serving": False}
    assert response.headers["cache-control"] == "no-store"
    bad = await client.get("/v1/ready?wait=soon")
    assert bad.status_code == 400 and "wait" in bad.json()["message"]
