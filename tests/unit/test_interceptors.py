"""The interceptor seam of the one server start-up: every RPC of every service passes through the
interceptors a server is given, and the error interceptor maps each domain exception to its status."""
import contextlib
import re

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY

from image_to_sound.v1 import (audio_pb2, audio_pb2_grpc, common_pb2, orchestrator_pb2 as pb, orchestrator_pb2_grpc,
                               vision_pb2, vision_pb2_grpc)
from serving import errors
from serving.interceptors import GuardInterceptor
from serving.server import GrpcServer, ServerOptions

# One row per domain exception: what the handler raises -> the status and message the client sees.
ERROR_TABLE = [
    (errors.InvalidInput("image is required"), grpc.StatusCode.INVALID_ARGUMENT, "image is required"),
    (errors.NotReady("the VLM is still loading"), grpc.StatusCode.UNAVAILABLE, "the VLM is still loading"),
    (errors.Overloaded("16 requests already waiting"), grpc.StatusCode.RESOURCE_EXHAUSTED, "16 requests already waiting"),
    (errors.Cancelled(), grpc.StatusCode.CANCELLED, "cancelled"),
    (errors.DeadlineExceeded(), grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"),
    (errors.Upstream(grpc.StatusCode.NOT_FOUND, "vision service: gone"), grpc.StatusCode.NOT_FOUND, "vision service: gone"),
    (TimeoutError(), grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"),
    # Anything else: INTERNAL with a generic message and a correlation id; the exception's text (a path
    # here) stays in the log.
    (RuntimeError("/srv/models/secret.bin is corrupt"), grpc.StatusCode.INTERNAL,
     re.compile(r"internal error \(error id [0-9a-f]{16}\)")),
]


def _raising_server(exc: BaseException, streaming: bool) -> GrpcServer:
    async def unary(request: bytes, context) -> bytes:
        raise exc

    async def stream(request: bytes, context):
        yield b"first"  # the error comes after a message has been sent
        raise exc

    handler = grpc.method_handlers_generic_handler("test.Errors", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
    })
    return GrpcServer(ServerOptions(port=0, grace_seconds=0.1), lambda s: s.add_generic_rpc_handlers((handler,)), [])


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("exc,code,message", ERROR_TABLE, ids=[type(row[0]).__name__ for row in ERROR_TABLE])
async def test_error_interceptor_maps_each_domain_exception(exc, code, message, streaming):
    server = _raising_server(exc, streaming)
    await server.start()
    method = "Stream" if streaming else "Unary"
    before = REGISTRY.get_sample_value("i2s_rpcs_total", {"method": method, "code": code.name}) or 0.0
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                if streaming:
                    call = channel.unary_stream(f"/test.Errors/{method}")(b"")
                    assert await call.read() == b"first"
                    await call.read()
                else:
                    await channel.unary_unary(f"/test.Errors/{method}")(b"")
    finally:
        await server.stop()
    assert info.value.code() == code
    if isinstance(message, re.Pattern):
        assert message.fullmatch(info.value.details()), info.value.details()
    else:
        assert info.value.details() == message
    # The metrics interceptor (outermost) saw the status the error interceptor chose.
    assert REGISTRY.get_sample_value("i2s_rpcs_total", {"method": method, "code": code.name}) == before + 1


class RecordingInterceptor(GuardInterceptor):
    """Records (method, status code name) of every call it wraps. It runs inside the error interceptor,
    so it sees the domain exception itself; the name is what that exception maps to."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    @contextlib.asynccontextmanager
    async def guard(self, method, context):
        try:
            yield
        except Exception as exc:
            self.calls.append((method, errors.status_for(exc)[0].name))
            raise
        else:
            self.calls.append((method, "OK"))


async def _common_calls(channel, service_name: str) -> None:
    await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))

    async def list_services():
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for response in reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(list_services()):
        names = {s.name for s in response.list_services_response.service}
        assert service_name in names


async def _expect_code(call, code: grpc.StatusCode) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        result = call()
        if hasattr(result, "__aiter__"):
            async for _ in result:
                pass
        else:
            await result
    assert info.value.code() == code


async def test_a_server_interceptor_sees_every_rpc_of_every_service(tmp_path):
    from audio_service.config import AudioConfig
    from audio_service.diffusers_backend import DiffusersAudioBackend
    from audio_service.server import make_server as make_audio_server
    from orchestrator.config import OrchestratorConfig
    from orchestrator.server import Orchestrator
    from vlm_service.config import VlmConfig
    from vlm_service.server import make_server as make_vlm_server
    from vlm_service.transformers_backend import TransformersVisionBackend

    recorder = RecordingInterceptor()
    # Model services whose backends are never loaded: every call is answered UNAVAILABLE, and still seen.
    vlm_server, vlm_servicer = make_vlm_server(
        VlmConfig(model=str(tmp_path / "none"), server=ServerOptions(port=0, grace_seconds=0.1)),
        TransformersVisionBackend(str(tmp_path / "none"), device="cpu"), [recorder])
    audio_server, audio_servicer = make_audio_server(
        AudioConfig(model=str(tmp_path / "none"), server=ServerOptions(port=0, grace_seconds=0.1)),
        DiffusersAudioBackend(str(tmp_path / "none"), device="cpu"), [recorder])
    await vlm_server.start()
    await audio_server.start()
    orchestrator = Orchestrator(OrchestratorConfig(vlm_target=vlm_server.address, audio_target=audio_server.address,
                                                   server=ServerOptions(port=0, grace_seconds=0.1)), [recorder])
    await orchestrator.server.start()
    image = common_pb2.Image(data=b"\x89PNG not really", mime_type="image/png")
    description = common_pb2.SceneDescription(scene="a kitchen", sources=[common_pb2.SoundSource(
        id="s1", name="kettle", variants=[common_pb2.SoundVariant(id="s1v1", action="whistling")])])
    try:
        async with grpc.aio.insecure_channel(vlm_server.address) as channel:
            stub = vision_pb2_grpc.VisionServiceStub(channel)
            await _expect_code(lambda: stub.DescribeScene(vision_pb2.DescribeSceneRequest(image=image)),
                               grpc.StatusCode.UNAVAILABLE)
            await _expect_code(lambda: stub.StreamSceneDescription(vision_pb2.StreamSceneDescriptionRequest(image=image)),
                               grpc.StatusCode.UNAVAILABLE)
            await _common_calls(channel, "image_to_sound.v1.VisionService")
        async with grpc.aio.insecure_channel(audio_server.address) as channel:
            stub = audio_pb2_grpc.AudioServiceStub(channel)
            await _expect_code(lambda: stub.GenerateAudio(audio_pb2.GenerateAudioRequest(prompt="a kettle whistles")),
                               grpc.StatusCode.UNAVAILABLE)
            await _common_calls(channel, "image_to_sound.v1.AudioService")
        async with grpc.aio.insecure_channel(orchestrator.server.address) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
            events = [e async for e in stub.ImageToSound(pb.ImageToSoundRequest(
                description=description, options=pb.PipelineOptions(skip_audio=True)))]
            assert events

            async def one_bad_message():
                yield pb.StreamImagesToSoundRequest()  # neither config nor image

            await _expect_code(lambda: stub.StreamImagesToSound(one_bad_message()), grpc.StatusCode.INVALID_ARGUMENT)
            await _common_calls(channel, "image_to_sound.v1.Orchestrator")
    finally:
        await orchestrator.server.stop()
        await orchestrator.close()
        await vlm_server.stop()
        await audio_server.stop()
        vlm_servicer.close()
        await audio_servicer.close()

    seen = dict(recorder.calls)
    assert seen["/image_to_sound.v1.VisionService/DescribeScene"] == "UNAVAILABLE"
    assert seen["/image_to_sound.v1.VisionService/StreamSceneDescription"] == "UNAVAILABLE"
    assert seen["/image_to_sound.v1.AudioService/GenerateAudio"] == "UNAVAILABLE"
    assert seen["/image_to_sound.v1.Orchestrator/ImageToSound"] == "OK"
    assert seen["/image_to_sound.v1.Orchestrator/StreamImagesToSound"] == "INVALID_ARGUMENT"
    methods = [m for m, _ in recorder.calls]
    # Health and reflection of each of the three servers went through the interceptor too.
    assert methods.count("/grpc.health.v1.Health/Check") == 3
    assert methods.count("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") == 3


async def test_health_watchers_keep_hearing_changes_after_another_watcher_leaves():
    """grpcio-health-checking's own aio Watch goes deaf for everyone once one watcher disconnects."""
    server = GrpcServer(ServerOptions(port=0, grace_seconds=0.1), lambda s: None, [])
    await server.start()
    await server.set_serving(True)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            leaving = stub.Watch(health_pb2.HealthCheckRequest(service=""))
            staying = stub.Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await leaving.read()).status == health_pb2.HealthCheckResponse.SERVING
            assert (await staying.read()).status == health_pb2.HealthCheckResponse.SERVING
            leaving.cancel()
            # Synchronise on the server having seen the cancellation: its condition has one waiter left.
            condition = server.health._server_watchers[""]
            while len(condition._waiters) != 1:  # noqa: ASYNC110 - one event-loop turn per check
                await __import__("asyncio").sleep(0)
            await server.set_serving(False)
            assert (await staying.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            staying.cancel()
    finally:
        await server.stop()
