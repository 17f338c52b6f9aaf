"""TLS, mutual TLS, bearer tokens, reflection and error hygiene of the one server start-up (GrpcServer),
on real loopback servers with certificates made in the test.

Reloads are synchronised without sleeping: the server's certificate fetcher runs on every new
connection's handshake and the token check on every call, so "rewrite the files, then open a new
connection / make a new call" is the synchronisation point."""
from __future__ import annotations

import logging
import os
import re

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from serving import security
from serving.server import GrpcServer, ServerOptions
from tests.security.pki import CertificateAuthority, MountedSecret

BOUND = 20  # seconds: every call of these tests has this deadline


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca, rogue = CertificateAuthority(folder / "ca", "ca"), CertificateAuthority(folder / "rogue", "rogue")
    return {
        "ca": ca, "rogue": rogue,
        "server": ca.issue("server", server=True), "client": ca.issue("client", server=False),
        "rogue_server": rogue.issue("rogue-server", server=True), "rogue_client": rogue.issue("rogue-client", server=False),
    }


async def _ping(request: bytes, context) -> bytes:
    return b"pong:" + request


async def _fail(request: bytes, context) -> bytes:
    # What an unexpected failure may carry: a server path and a secret. Neither may reach the client.
    raise RuntimeError("cannot open /srv/models/secret.bin with token s3cr3t")


def _register(server: grpc.aio.Server) -> None:
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Secure", {
        "Ping": grpc.unary_unary_rpc_method_handler(_ping),
        "Fail": grpc.unary_unary_rpc_method_handler(_fail),
    }),))


async def _started(**options) -> GrpcServer:
    server = GrpcServer(ServerOptions(host="127.0.0.1", port=0, grace_seconds=0.1, **options), _register,
                        ["test.Secure"])
    await server.start()
    await server.set_serving(True)
    return server


def _tls(pki, ca: str = "ca", client: str | None = None) -> grpc.ChannelCredentials:
    issued = pki[client] if client else None
    return security.client_credentials(str(pki[ca].cert_file), issued and str(issued.cert), issued and str(issued.key))


async def _call(address: str, credentials: grpc.ChannelCredentials | None = None,
                call_credentials: grpc.CallCredentials | None = None, method: str = "Ping") -> bytes:
    """One call on a NEW channel (a new connection, so a new TLS handshake)."""
    from serving.channels import channel_credentials

    creds = channel_credentials(credentials, call_credentials)
    channel = grpc.aio.insecure_channel(address) if creds is None else grpc.aio.secure_channel(address, creds)
    async with channel:
        return await channel.unary_unary(f"/test.Secure/{method}")(b"x", timeout=BOUND)


async def _health(address: str, credentials: grpc.ChannelCredentials | None = None) -> int:
    channel = grpc.aio.insecure_channel(address) if credentials is None else grpc.aio.secure_channel(address, credentials)
    async with channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=BOUND)
        return response.status


async def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code()


async def test_tls_serves_clients_that_trust_its_ca_and_no_one_else(pki):
    server = await _started(tls_cert_file=str(pki["server"].cert), tls_key_file=str(pki["server"].key))
    try:
        assert await _call(server.address, _tls(pki)) == b"pong:x"
        assert await _health(server.address, _tls(pki)) == health_pb2.HealthCheckResponse.SERVING
        # Plaintext to a TLS port, and TLS trusting another CA: the handshake fails.
        assert await _code(_call(server.address)) == grpc.StatusCode.UNAVAILABLE
        assert await _code(_call(server.address, _tls(pki, ca="rogue"))) == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop()


async def test_mutual_tls_rejects_clients_without_a_certificate_from_its_ca(pki):
    server = await _started(tls_cert_file=str(pki["server"].cert), tls_key_file=str(pki["server"].key),
                            tls_client_ca_file=str(pki["ca"].cert_file))
    try:
        assert await _call(server.address, _tls(pki, client="client")) == b"pong:x"
        assert await _code(_call(server.address, _tls(pki))) == grpc.StatusCode.UNAVAILABLE  # no client cert
        assert await _code(_call(server.address, _tls(pki, client="rogue_client"))) == grpc.StatusCode.UNAVAILABLE
        # Health needs the transport too (it is a property of the port), but no token: see the token test.
        assert await _health(server.address, _tls(pki, client="client")) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop()


async def test_a_certificate_rotated_on_disk_is_served_to_new_connections_without_a_restart(pki, tmp_path, caplog):
    secret = MountedSecret(tmp_path / "tls")
    secret.update(**{"tls.crt": pki["server"].cert, "tls.key": pki["server"].key})
    server = await _started(tls_cert_file=secret["tls.crt"], tls_key_file=secret["tls.key"])
    try:
        assert await _call(server.address, _tls(pki)) == b"pong:x"
        assert await _code(_call(server.address, _tls(pki, ca="rogue"))) == grpc.StatusCode.UNAVAILABLE

        # Half a rotation (the new key with the old certificate): unusable, so the old pair is kept.
        with caplog.at_level(logging.WARNING, logger="serving.security"):
            secret.update(**{"tls.crt": pki["server"].cert, "tls.key": pki["rogue_server"].key})
            assert await _call(server.address, _tls(pki)) == b"pong:x"
        assert "keeping the previous ones" in caplog.text
        assert str(tmp_path) not in caplog.text  # the log names the setting, not the server's path

        # The Secret is rotated to a certificate from another CA: new connections get the new one.
        secret.update(**{"tls.crt": pki["rogue_server"].cert, "tls.key": pki["rogue_server"].key})
        assert await _call(server.address, _tls(pki, ca="rogue")) == b"pong:x"
        assert await _code(_call(server.address, _tls(pki))) == grpc.StatusCode.UNAVAILABLE
        assert server.certificates.loads == 2  # the first pair and the rotated one; never the broken one
    finally:
        await server.stop()


async def test_sighup_reload_rereads_files_whose_identity_did_not_change(tmp_path):
    watched = security.WatchedFiles({"tls-cert-file": str(tmp_path / "a")})
    (tmp_path / "a").write_text("one")
    assert watched.changed() and not watched.changed()
    security._WATCHED.add(watched)
    security.reload_all()  # what SIGHUP calls
    assert watched.changed() and not watched.changed()


async def test_bearer_tokens_guard_every_rpc_but_health_and_rotate_through_the_file(tmp_path, caplog):
    tokens = tmp_path / "tokens"
    tokens.write_text("# current\nfirst-token\n")
    server = await _started(auth_tokens_file=str(tokens))
    local = grpc.local_channel_credentials()  # a token needs a secure channel; loopback counts as one
    try:
        assert await _call(server.address, local, security.token_call_credentials("first-token")) == b"pong:x"
        # Health stays open for probes; reflection does not.
        assert await _health(server.address) == health_pb2.HealthCheckResponse.SERVING
        async with grpc.aio.insecure_channel(server.address) as channel:
            async def list_services():
                yield reflection_pb2.ServerReflectionRequest(list_services="")
            assert await _code(_first(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                list_services()))) == grpc.StatusCode.UNAUTHENTICATED

        # No token, a wrong token, a wrong scheme: the same answer, which says nothing about what failed.
        details = set()
        with caplog.at_level(logging.INFO):
            for metadata in [(), (("authorization", "Bearer wrong-token"),), (("authorization", "Basic first-token"),),
                             (("authorization", "Bearer first-token-and-more"),)]:
                async with grpc.aio.insecure_channel(server.address) as channel:
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await channel.unary_unary("/test.Secure/Ping")(b"x", metadata=metadata, timeout=BOUND)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                details.add(info.value.details())
        assert details == {"unauthenticated"}
        assert "wrong-token" not in caplog.text and "first-token" not in caplog.text

        # Rotation: add the new token beside the old, move clients over, then drop the old one. The file is
        # checked on each call, so the next call after the rewrite is the synchronisation point.
        tokens.write_text("first-token\nsecond-token\n")
        os.utime(tokens, ns=(1_000_000_000, 1_000_000_000))
        for token in ("first-token", "second-token"):
            assert await _call(server.address, local, security.token_call_credentials(token)) == b"pong:x"
        tokens.write_text("second-token\n")
        os.utime(tokens, ns=(2_000_000_000, 2_000_000_000))
        assert await _code(_call(server.address, local, security.token_call_credentials("first-token"))) \
            == grpc.StatusCode.UNAUTHENTICATED
        assert await _call(server.address, local, security.token_call_credentials("second-token")) == b"pong:x"
        # Emptied mid-rotation: keeping the last tokens beats locking every client out.
        tokens.write_text("")
        assert await _call(server.address, local, security.token_call_credentials("second-token")) == b"pong:x"
    finally:
        await server.stop()


async def _first(call):
    async for response in call:
        return response


async def test_tokens_from_the_environment_and_a_client_token_file_reread_when_it_changes(tmp_path, monkeypatch):
    tokens, mine = tmp_path / "tokens", tmp_path / "my-token"
    tokens.write_text("alpha\nbeta\n")
    mine.write_text("alpha\n")
    with pytest.raises(security.SecurityConfigError, match="auth-tokens-env"):
        security.AllowedTokens(env_var="TEST_I2S_TOKENS", environ={})  # a variable with no token is refused
    monkeypatch.setenv("TEST_I2S_TOKENS", "gamma, delta")
    server = await _started(auth_tokens_env="TEST_I2S_TOKENS", auth_tokens_file=str(tokens))
    local = grpc.local_channel_credentials()
    try:
        for token in ("alpha", "beta", "gamma", "delta"):
            assert await _call(server.address, local, security.token_call_credentials(token)) == b"pong:x"
        assert await _code(_call(server.address, local, security.token_call_credentials("gamma, delta"))) \
            == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await server.stop()

    server = await _started(auth_tokens_file=str(tokens))
    call_credentials = security.token_call_credentials(token_file=str(mine))
    try:
        async with grpc.aio.secure_channel(server.address, grpc.composite_channel_credentials(
                grpc.local_channel_credentials(), call_credentials)) as channel:
            ping = channel.unary_unary("/test.Secure/Ping")
            assert await ping(b"1", timeout=BOUND) == b"pong:1"
            mine.write_text("gamma\n")
            os.utime(mine, ns=(1_000_000_000, 1_000_000_000))
            assert await _code(ping(b"2", timeout=BOUND)) == grpc.StatusCode.UNAUTHENTICATED  # same channel
            mine.write_text("beta\n")
            os.utime(mine, ns=(2_000_000_000, 2_000_000_000))
            assert await ping(b"3", timeout=BOUND) == b"pong:3"
    finally:
        await server.stop()


async def test_tls_and_token_together_and_misconfiguration_refused_at_start(pki, tmp_path):
    (tmp_path / "tokens").write_text("t1\n")
    server = await _started(tls_cert_file=str(pki["server"].cert), tls_key_file=str(pki["server"].key),
                            tls_client_ca_file=str(pki["ca"].cert_file), auth_tokens_file=str(tmp_path / "tokens"))
    try:
        creds = _tls(pki, client="client")
        assert await _call(server.address, creds, security.token_call_credentials("t1")) == b"pong:x"
        assert await _code(_call(server.address, creds)) == grpc.StatusCode.UNAUTHENTICATED
        assert await _health(server.address, creds) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop()
    (tmp_path / "empty").write_text("\n# nothing\n")
    bad = [dict(tls_cert_file=str(pki["server"].cert)),  # no key
           dict(tls_client_ca_file=str(pki["ca"].cert_file)),  # mTLS without a server certificate
           dict(tls_cert_file=str(pki["server"].cert), tls_key_file=str(pki["client"].key)),  # not its key
           dict(tls_cert_file=str(tmp_path / "missing.crt"), tls_key_file=str(pki["server"].key)),
           dict(auth_tokens_file=str(tmp_path / "empty")),
           dict(auth_tokens_file=str(tmp_path / "missing"))]
    for options in bad:
        with pytest.raises(security.SecurityConfigError) as info:
            GrpcServer(ServerOptions(port=0, **options), _register, [])
        assert str(tmp_path) not in str(info.value)  # names the setting, not the path


async def test_internal_errors_carry_a_correlation_id_that_is_in_the_log(caplog):
    server = await _started()
    try:
        with caplog.at_level(logging.ERROR, logger="serving.interceptors"):
            async with grpc.aio.insecure_channel(server.address) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await channel.unary_unary("/test.Secure/Fail")(b"x", timeout=BOUND)
    finally:
        await server.stop()
    assert info.value.code() == grpc.StatusCode.INTERNAL
    match = re.fullmatch(r"internal error \(error id ([0-9a-f]{16})\)", info.value.details())
    assert match, info.value.details()
    [record] = [r for r in caplog.records if match.group(1) in r.getMessage()]
    assert "/test.Secure/Fail" in record.getMessage()
    assert "secret.bin" in str(record.exc_info[1])  # the details are in the log, with the traceback


async def test_reflection_can_be_turned_off():
    for enabled in (True, False):
        server = await _started(reflection=enabled)
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                async def list_services():
                    yield reflection_pb2.ServerReflectionRequest(list_services="")
                call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(list_services())
                if enabled:
                    names = {s.name for s in (await _first(call)).list_services_response.service}
                    assert "test.Secure" in names
                else:
                    assert await _code(_first(call)) == grpc.StatusCode.UNIMPLEMENTED
            assert await _health(server.address) == health_pb2.HealthCheckResponse.SERVING
        finally:
            await server.stop()


async def test_a_plaintext_health_only_port_serves_probes_of_a_mutual_tls_server(pki, tmp_path):
    (tmp_path / "tokens").write_text("t1\n")
    server = GrpcServer(ServerOptions(host="127.0.0.1", port=0, health_port=0, grace_seconds=0.1,
                                      tls_cert_file=str(pki["server"].cert), tls_key_file=str(pki["server"].key),
                                      tls_client_ca_file=str(pki["ca"].cert_file),
                                      auth_tokens_file=str(tmp_path / "tokens")), _register, ["test.Secure"])
    await server.start()
    probe = f"127.0.0.1:{server.health_port}"
    try:
        assert server.health_port not in (-1, 0, server.port)
        assert await _health(probe) == health_pb2.HealthCheckResponse.NOT_SERVING
        await server.set_serving(True)
        assert await _health(probe) == health_pb2.HealthCheckResponse.SERVING
        # Only health there: the service and reflection are not reachable through the plaintext port.
        assert await _code(_call(probe)) == grpc.StatusCode.UNIMPLEMENTED
        async with grpc.aio.insecure_channel(probe) as channel:
            async def list_services():
                yield reflection_pb2.ServerReflectionRequest(list_services="")
            assert await _code(_first(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                list_services()))) == grpc.StatusCode.UNIMPLEMENTED
        await server.health.enter_graceful_shutdown()  # what SIGTERM does first
        assert await _health(probe) == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await server.stop()
