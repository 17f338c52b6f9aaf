"""Security settings reach every server and client the project ships: the three services' flags and
environment, the orchestrator's calls to the model services, the Python clients and main.py --orchestrator.

The model services here are the fakes of tests/fake_services.py (orchestration only, as their names say)
behind the real GrpcServer start-up; the orchestrator, clients and command line are the real ones."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import shutil
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from image_to_sound.v1 import (audio_pb2, audio_pb2_grpc, common_pb2, orchestrator_pb2 as pb, vision_pb2,
                               vision_pb2_grpc)
from i2s_cli import cli
from i2s_client import AsyncImageToSoundClient, ImageToSoundClient
from orchestrator.config import OrchestratorConfig
from orchestrator.server import Orchestrator
from serving import security
from serving.config import settings
from serving.server import GrpcServer, ServerOptions
from tests.fake_services import FakeAudioServicer, FakeVisionServicer
from tests.security.pki import CertificateAuthority

ROOT = Path(__file__).resolve().parents[2]
BOUND = 60
IMAGE = ROOT / "data" / "coffee.png"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(folder, "ca")
    files = {"ca": str(ca.cert_file)}
    ca2 = CertificateAuthority(folder / "2", "ca2")  # the next generation, for rotations
    issued = ca2.issue("client2", server=False)
    files.update(ca2=str(ca2.cert_file), client2_cert=str(issued.cert), client2_key=str(issued.key))
    for name, server in (("server", True), ("client", False)):
        issued = ca.issue(name, server=server)
        files[f"{name}_cert"], files[f"{name}_key"] = str(issued.cert), str(issued.key)
    (folder / "tokens").write_text("old-token\nnew-token\n")
    (folder / "token").write_text("new-token\n")
    (folder / "wrong-token").write_text("guess\n")
    files.update(tokens=str(folder / "tokens"), token=str(folder / "token"), wrong_token=str(folder / "wrong-token"))
    return files


def test_the_agreed_setting_names_are_flags_and_variables_of_every_service():
    """deploy/ and the README use these names; they must not drift."""
    from audio_service.config import AudioConfig
    from vlm_service.config import VlmConfig

    wanted = {"tls-cert-file", "tls-key-file", "tls-client-ca-file", "auth-tokens-file", "reflection"}
    for cls, prefix in ((VlmConfig, "VLM"), (AudioConfig, "AUDIO"), (OrchestratorConfig, "ORCHESTRATOR")):
        table = {s.flag: s for s in settings(cls)}
        assert wanted <= set(table)
        assert table["tls-cert-file"].env_name(prefix) == f"I2S_{prefix}_TLS_CERT_FILE"
        assert table["reflection"].default is True
    downstream = {s.flag for s in settings(OrchestratorConfig)}
    assert {"downstream-tls-ca-file", "downstream-tls-cert-file", "downstream-tls-key-file",
            "downstream-token-file"} <= downstream


def _security_flags(pki) -> list[str]:
    return ["--port", "0", "--tls-cert-file", pki["server_cert"], "--tls-key-file", pki["server_key"],
            "--tls-client-ca-file", pki["ca"], "--no-reflection"]


def _client_tls(pki) -> grpc.ChannelCredentials:
    return security.client_credentials(pki["ca"], pki["client_cert"], pki["client_key"])


@pytest.mark.parametrize("service", ["vlm", "audio", "orchestrator"])
async def test_each_service_takes_tls_tokens_and_reflection_from_its_flags_and_environment(service, pki, tmp_path,
                                                                                            monkeypatch):
    # The token file comes from the environment, the rest from flags: both paths of the config.
    monkeypatch.setenv(f"I2S_{service.upper()}_AUTH_TOKENS_FILE", pki["tokens"])
    argv = _security_flags(pki)
    if service == "vlm":
        from vlm_service.config import parse_args
        from vlm_service.server import make_server
        from vlm_service.transformers_backend import TransformersVisionBackend

        config = parse_args(["--model", str(tmp_path / "none"), *argv])
        server, servicer = make_server(config, TransformersVisionBackend(config.model, device="cpu"))

        async def close():
            servicer.close()

        name = "image_to_sound.v1.VisionService"
        call = lambda ch, md: vision_pb2_grpc.VisionServiceStub(ch).DescribeScene(  # noqa: E731
            vision_pb2.DescribeSceneRequest(image=common_pb2.Image(data=b"x", mime_type="image/png")),
            metadata=md, timeout=BOUND)
        authorised_code = grpc.StatusCode.UNAVAILABLE  # reached the servicer: the model is not loaded
    elif service == "audio":
        from audio_service.config import parse_args
        from audio_service.diffusers_backend import DiffusersAudioBackend
        from audio_service.server import make_server

        config = parse_args(["--model", str(tmp_path / "none"), *argv])
        server, servicer = make_server(config, DiffusersAudioBackend(config.model, device="cpu"))

        async def close():
            await servicer.close()

        name = "image_to_sound.v1.AudioService"

        async def call(ch, md):
            async for _ in audio_pb2_grpc.AudioServiceStub(ch).GenerateAudio(
                    audio_pb2.GenerateAudioRequest(prompt="a kettle whistles"), metadata=md, timeout=BOUND):
                pass

        authorised_code = grpc.StatusCode.UNAVAILABLE
    else:
        from orchestrator.config import parse_args

        config = parse_args(["--vlm", "", "--audio", "", *argv])
        orchestrator = Orchestrator(config)
        server, close, name = orchestrator.server, orchestrator.close, "image_to_sound.v1.Orchestrator"

        from image_to_sound.v1 import orchestrator_pb2_grpc

        async def call(ch, md):  # a description needs no VLM; skip_audio needs no audio service
            description = common_pb2.SceneDescription(scene="a kitchen", sources=[common_pb2.SoundSource(
                id="s1", name="kettle", variants=[common_pb2.SoundVariant(id="s1v1", action="whistling")])])
            events = [e async for e in orchestrator_pb2_grpc.OrchestratorStub(ch).ImageToSound(pb.ImageToSoundRequest(
                description=description, options=pb.PipelineOptions(skip_audio=True)), metadata=md, timeout=BOUND)]
            assert events[-1].WhichOneof("event") == "summary"

        authorised_code = None
    await server.start()
    await server.set_serving(True)
    address = f"127.0.0.1:{server.port}"
    try:
        # Plaintext to the TLS port fails; TLS without a client certificate fails (mutual TLS).
        async with grpc.aio.insecure_channel(address) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=BOUND)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        async with grpc.aio.secure_channel(address, security.client_credentials(pki["ca"])) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=BOUND)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        async with grpc.aio.secure_channel(address, _client_tls(pki)) as ch:
            # Health: open without a token. The service: UNAUTHENTICATED without one, served with one.
            response = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=name),
                                                                  timeout=BOUND)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(ch, (("authorization", "Bearer guess"),))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            if authorised_code is None:
                await call(ch, (("authorization", "Bearer new-token"),))
            else:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call(ch, (("authorization", "Bearer old-token"),))
                assert info.value.code() == authorised_code
            # --no-reflection
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async def ask():
                    yield reflection_pb2.ServerReflectionRequest(list_services="")
                async for _ in reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                        ask(), metadata=(("authorization", "Bearer new-token"),), timeout=BOUND):
                    pass
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop()
        await close()


def _model_service_options(pki, client_ca: str | None = None) -> ServerOptions:
    return ServerOptions(host="127.0.0.1", port=0, grace_seconds=0.5, tls_cert_file=pki["server_cert"],
                         tls_key_file=pki["server_key"], tls_client_ca_file=client_ca or pki["ca"],
                         auth_tokens_file=pki["tokens"])


@contextlib.asynccontextmanager
async def secure_stack(pki, client_ca: str | None = None, **downstream):
    """Fake VLM + fake audio with mutual TLS and tokens, and the real orchestrator calling them over mutual
    TLS with its token (overridable), itself serving TLS with tokens. Yields (orchestrator, vision, audio)."""
    vision, audio = FakeVisionServicer(), FakeAudioServicer()
    servers = [
        GrpcServer(_model_service_options(pki, client_ca), lambda s: vision_pb2_grpc.add_VisionServiceServicer_to_server(vision, s),
                   ["image_to_sound.v1.VisionService"]),
        GrpcServer(_model_service_options(pki, client_ca), lambda s: audio_pb2_grpc.add_AudioServiceServicer_to_server(audio, s),
                   ["image_to_sound.v1.AudioService"]),
    ]
    for server in servers:
        await server.start()
        await server.set_serving(True)
    vision.grpc_server, audio.grpc_server = servers  # a test may restart one
    settings_ = dict(downstream_tls_ca_file=pki["ca"], downstream_tls_cert_file=pki["client_cert"],
                     downstream_tls_key_file=pki["client_key"], downstream_token_file=pki["token"])
    settings_.update(downstream)
    config = OrchestratorConfig(
        vlm_target=f"127.0.0.1:{servers[0].port}", audio_target=f"127.0.0.1:{servers[1].port}",
        server=ServerOptions(host="127.0.0.1", port=0, grace_seconds=0.5, tls_cert_file=pki["server_cert"],
                             tls_key_file=pki["server_key"], auth_tokens_file=pki["tokens"]),
        **settings_)
    orchestrator = Orchestrator(config)
    await orchestrator.server.start()
    try:
        yield orchestrator, vision, audio
    finally:
        await orchestrator.server.stop()
        await orchestrator.close()
        for server in servers:
            await server.stop()


async def test_orchestrator_calls_the_model_services_over_mutual_tls_with_its_token_and_clients_use_tls(pki):
    async with secure_stack(pki) as (orchestrator, vision, audio):
        await orchestrator.wait_for_backends(timeout=BOUND)
        await orchestrator.server.set_serving(True)
        target = f"127.0.0.1:{orchestrator.server.port}"

        # The blocking client (in a thread: the servers run on this loop) and the asyncio client.
        def blocking():
            with ImageToSoundClient(target, tls_ca_file=pki["ca"], token_file=pki["token"], timeout=BOUND) as client:
                return client.generate(IMAGE, duration_seconds=1)

        result = await asyncio.to_thread(blocking)
        assert result.ok and len([c for c in result.clips if c.done]) == 6
        async with AsyncImageToSoundClient(target, tls_ca_file=pki["ca"], token="old-token", timeout=BOUND) as client:
            result = await client.generate(IMAGE, duration_seconds=1)
        assert result.ok and len(result.clips) == 6
        assert (vision.calls, len(audio.prompts)) == (2, 12)

        async with AsyncImageToSoundClient(target, tls_ca_file=pki["ca"], token_file=pki["wrong_token"],
                                           timeout=BOUND) as client:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.generate(IMAGE, duration_seconds=1)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert vision.calls == 2


async def test_orchestrator_with_a_wrong_downstream_token_or_no_client_certificate_is_refused_downstream(pki):
    async with secure_stack(pki, downstream_token_file=pki["wrong_token"]) as (orchestrator, vision, audio):
        await orchestrator.wait_for_backends(timeout=BOUND)  # health needs no token
        await orchestrator.server.set_serving(True)
        async with AsyncImageToSoundClient(f"127.0.0.1:{orchestrator.server.port}", tls_ca_file=pki["ca"],
                                           token="new-token", timeout=BOUND) as client:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.generate(IMAGE, duration_seconds=1)
        # The caller's token was fine: the orchestrator's own was refused, which is the server's fault.
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert re.fullmatch(r"internal error \(error id [0-9a-f]{16}\)", info.value.details())
        assert vision.calls == 0
    async with secure_stack(pki, downstream_tls_cert_file=None, downstream_tls_key_file=None) as (orchestrator, _, _):
        with pytest.raises(grpc.aio.AioRpcError) as info:  # the model services' mutual TLS refuses the handshake
            await health_pb2_grpc.HealthStub(orchestrator.channels["vlm"]).Check(
                health_pb2.HealthCheckRequest(), timeout=BOUND)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_main_py_orchestrator_mode_connects_with_tls_and_a_token(pki, tmp_path, monkeypatch):
    shutil.copy(IMAGE, tmp_path / "coffee.png")
    monkeypatch.chdir(tmp_path)
    async with secure_stack(pki) as (orchestrator, vision, audio):
        await orchestrator.wait_for_backends(timeout=BOUND)
        await orchestrator.server.set_serving(True)
        base = ["--orchestrator", f"127.0.0.1:{orchestrator.server.port}", "--single", "coffee.png",
                "--no_progress", "--audio_seconds", "1", "--tls_ca_file", pki["ca"]]

        def run(*extra: str) -> int:
            return cli.main([*base, *extra])

        assert await asyncio.wait_for(asyncio.to_thread(run, "--save_log", "run.log"), BOUND) == 1  # no token
        assert "stream ended: UNAUTHENTICATED" in (tmp_path / "run.log").read_text()
        assert not (tmp_path / "result").exists()
        monkeypatch.setenv("I2S_AUTH_TOKEN", "old-token")
        assert await asyncio.wait_for(asyncio.to_thread(run), BOUND) == 0
        monkeypatch.delenv("I2S_AUTH_TOKEN")
        assert len(list((tmp_path / "result" / "coffee").glob("*.wav"))) == 6
        assert await asyncio.wait_for(asyncio.to_thread(run, "--token_file", pki["token"], "--overwrite"), BOUND) == 0
        assert vision.calls == 2


async def test_orchestrator_moves_to_a_rotated_client_certificate_without_a_restart(pki, tmp_path):
    """cert-manager rotates the orchestrator's client certificate and the model services' client CA."""
    client_ca, cert, key = tmp_path / "client-ca.pem", tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(pki["ca"], client_ca)
    shutil.copy(pki["client_cert"], cert)
    shutil.copy(pki["client_key"], key)
    async with secure_stack(pki, client_ca=str(client_ca), downstream_tls_cert_file=str(cert),
                            downstream_tls_key_file=str(key)) as (orchestrator, vision, audio):
        await orchestrator.wait_for_backends(timeout=BOUND)
        await orchestrator.server.set_serving(True)
        assert not await orchestrator.reload_downstream_credentials()  # nothing changed

        async def one_image() -> None:
            async with AsyncImageToSoundClient(f"127.0.0.1:{orchestrator.server.port}", tls_ca_file=pki["ca"],
                                               token="new-token", timeout=BOUND) as client:
                result = await client.generate(IMAGE, options=pb.PipelineOptions(skip_audio=True))
            assert result.error is None and result.summary is not None

        await one_image()
        # The VLM now trusts only the next CA's client certificates, and restarts on its port with that (its
        # pod was replaced, say): every call needs a new handshake, which the old certificate fails.
        shutil.copy(pki["ca2"], client_ca)
        port = vision.grpc_server.port
        await vision.grpc_server.stop()
        restarted = GrpcServer(dataclasses.replace(_model_service_options(pki, str(client_ca)), port=port),
                               lambda s: vision_pb2_grpc.add_VisionServiceServicer_to_server(vision, s),
                               ["image_to_sound.v1.VisionService"])
        await restarted.start()
        await restarted.set_serving(True)
        try:
            async with grpc.aio.secure_channel(f"127.0.0.1:{port}", _client_tls(pki)) as old_certificate:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await health_pb2_grpc.HealthStub(old_certificate).Check(health_pb2.HealthCheckRequest(),
                                                                            timeout=BOUND)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            # The orchestrator's Secret is rotated to a certificate from the next CA: picked up, no restart.
            for source, target in ((pki["client2_cert"], cert), (pki["client2_key"], key)):
                shutil.copy(source, target)
                os.utime(target, ns=(3_000_000_000, 3_000_000_000))
            assert await orchestrator.reload_downstream_credentials()  # what the periodic check (and SIGHUP) runs
            await one_image()
            assert vision.calls == 2
        finally:
            await restarted.stop()
