"""The orchestrator's HTTP front (gateway/) on the real services with the tiny checkpoints, bearer tokens on:
the page in a real headless Chromium, the same events over HTTP (JSON lines, Connect) as over gRPC, and bad
input over HTTP answered with the mapped status.

Set I2S_HTTP_PAGE_SCREENSHOT=docs/screenshots/http-page.png to keep the page's screenshot; otherwise it stays
in the test's temporary folder, so a test run never changes the checkout."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import time
from pathlib import Path

import grpc
import httpx
import pytest
import pytest_asyncio
from google.protobuf import json_format

from image_to_sound.v1 import common_pb2, orchestrator_pb2 as pb, orchestrator_pb2_grpc
from serving.server import ServerOptions
from tests.real_stack import real_stack

ROOT = Path(__file__).resolve().parents[2]
PHOTO = ROOT / "data" / "coffee.png"
TOKEN = "http-front-test-token"
TOKENS_ENV = "I2S_TEST_HTTP_FRONT_TOKENS"
AUTH = {"authorization": f"Bearer {TOKEN}"}
WAIT = 120  # seconds: bounds every wait on the page and the stack


def reference_request(request_id: str = "http-test") -> pb.ImageToSoundRequest:
    """What the page sends for 'seconds 1, steps 2, audio seed 7, VLM seed 1' (sources located, the page's
    default), and main.py for the same."""
    request = pb.ImageToSoundRequest(
        request_id=request_id,
        decoding=common_pb2.DecodingSettings(seed=1, locate_sources=True),
        audio=common_pb2.AudioSettings(duration_seconds=1, num_inference_steps=2, seed=7,
                                       encoding=common_pb2.AUDIO_ENCODING_PCM_S16LE),
        options=pb.PipelineOptions(scene_mix=True))
    request.image.data = PHOTO.read_bytes()
    request.image.mime_type = "image/png"
    return request


@pytest_asyncio.fixture(scope="module")
async def front(tiny_vlm_dir, tiny_audio_dir):
    from gateway.front import HttpFront
    from gateway.options import HttpOptions

    os.environ[TOKENS_ENV] = TOKEN
    # 1 MiB messages: the upload limit (the gRPC one) is small enough to pass cheaply in a test.
    options = ServerOptions(port=0, grace_seconds=1, auth_tokens_env=TOKENS_ENV, max_message_mb=1)
    async with real_stack(tiny_vlm_dir, tiny_audio_dir, server=options) as stack:
        http = HttpFront(HttpOptions(http_port=0), options, stack.target)
        await http.start()
        try:
            yield stack, f"http://127.0.0.1:{http.port}"
        finally:
            await http.stop()
    os.environ.pop(TOKENS_ENV, None)


async def grpc_events(target: str, request: pb.ImageToSoundRequest) -> list[pb.ImageToSoundEvent]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
        return [event async for event in stub.ImageToSound(request, metadata=list(AUTH.items()), timeout=WAIT)]


async def json_lines_events(base: str, request: pb.ImageToSoundRequest) -> list[pb.ImageToSoundEvent]:
    body = json_format.MessageToJson(request)
    async with httpx.AsyncClient(timeout=WAIT) as client:
        async with client.stream("POST", f"{base}/v1/image-to-sound", content=body,
                                 headers={**AUTH, "content-type": "application/json"}) as response:
            assert response.status_code == 200, await response.aread()
            assert response.headers["content-type"].startswith("application/x-ndjson")
            return [json_format.ParseDict(json.loads(line), pb.ImageToSoundEvent())
                    async for line in response.aiter_lines() if line]


def comparable(events: list[pb.ImageToSoundEvent]) -> tuple[list[str], dict[str, bytes]]:
    """Each non-audio event as text without the fields that measure time, sorted (clips of one batch may
    finish in any order), and each clip's audio bytes."""
    texts, audio = [], {}
    for event in events:
        event = pb.ImageToSoundEvent.FromString(event.SerializeToString())
        kind = event.WhichOneof("event")
        if kind == "audio":
            audio[event.audio.clip.clip_id] = audio.get(event.audio.clip.clip_id, b"") + event.audio.chunk.data
            continue
        if kind == "clip_done":
            event.clip_done.metadata.ClearField("generation_seconds")
        if kind == "summary":
            event.summary.Clear()  # timings only, plus counts that the clip events already show
        texts.append(str(event))
    return sorted(texts), audio


async def test_http_streams_carry_the_grpc_stream(front):
    """JSON lines, Connect (binary protobuf and JSON) and gRPC-Web give the same events and audio bytes as
    gRPC for the same request and seeds."""
    from connectrpc.compat import google_protobuf_json_codec
    from connectrpc.protocol import ProtocolType
    from image_to_sound.v1.orchestrator_connect import OrchestratorClient

    stack, base = front
    reference = comparable(await grpc_events(stack.target, reference_request()))
    assert len(reference[1]) >= 2 and all(reference[1].values())
    assert comparable(await json_lines_events(base, reference_request())) == reference
    for kwargs in ({}, {"codec": google_protobuf_json_codec()}, {"protocol": ProtocolType.GRPC_WEB}):
        async with OrchestratorClient(base, **kwargs) as client:
            events = [e async for e in client.image_to_sound(reference_request(), headers=AUTH, timeout_ms=WAIT * 1000)]
        assert comparable(events) == reference


@pytest.mark.parametrize("case", ["too_large", "wrong_type", "no_token", "bad_token", "malformed", "invalid", "deadline"])
async def test_bad_input_over_http_gets_the_mapped_status(front, case):
    stack, base = front
    small = reference_request()
    small.options.skip_audio = True
    small.decoding.max_new_tokens = 16
    body = json_format.MessageToJson(small)
    headers = {**AUTH, "content-type": "application/json"}
    expected = {"too_large": (413, "resource_exhausted"), "wrong_type": (415, None), "no_token": (401, "unauthenticated"),
                "bad_token": (401, "unauthenticated"), "malformed": (400, "invalid_argument"),
                "invalid": (400, "invalid_argument"), "deadline": (504, "deadline_exceeded")}[case]
    if case == "too_large":
        big = pb.ImageToSoundRequest()
        big.image.data = os.urandom(2 * 1024 * 1024)
        body = json_format.MessageToJson(big)
    elif case == "wrong_type":
        headers["content-type"] = "text/plain"
    elif case == "no_token":
        del headers["authorization"]
    elif case == "bad_token":
        headers["authorization"] = "Bearer not-the-token"
    elif case == "malformed":
        body = '{"image": {"data": "not base64!!"}, "audio": '
    elif case == "deadline":
        headers["connect-timeout-ms"] = "20"  # far less than the VLM's first token takes
    elif case == "invalid":
        invalid = pb.ImageToSoundRequest.FromString(small.SerializeToString())
        invalid.options.max_clips = 10_000  # well-formed, refused by the gRPC port's own validation
        body = json_format.MessageToJson(invalid)
    async with httpx.AsyncClient(timeout=WAIT) as client:
        response = await client.post(f"{base}/v1/image-to-sound", content=body, headers=headers)
        assert response.status_code == expected[0], response.text
        assert len(response.content) < 2000 and "Traceback" not in response.text and 'File "' not in response.text
        if expected[1] is not None:
            assert response.json()["code"] == expected[1] and response.json()["message"]
        # The same refusal over Connect (binary protobuf, unary-style headers): the protocol's own status.
        if case in ("wrong_type",):
            connect = await client.post(f"{base}/image_to_sound.v1.Orchestrator/ImageToSound", content=b"x",
                                        headers={**AUTH, "content-type": "text/plain"})
            assert connect.status_code == 415
        # ... and the service goes on serving.
        ok = await client.post(f"{base}/v1/image-to-sound", content=json_format.MessageToJson(small),
                               headers={**AUTH, "content-type": "application/json"})
        assert ok.status_code == 200
        kinds = [key for line in ok.text.splitlines() for key in json.loads(line) if key != "requestId"]
        assert "scene" in kinds and "summary" in kinds and "error" not in kinds


async def test_page_plays_clips_as_they_stream(front, chromium, tmp_path):
    """Upload a photo from data/ in headless Chromium: scene text, a player per clip, the first clip playing
    before the last is done, the WAV download equal to main.py's file for the same seeds, no console errors."""
    from i2s_client import collect
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from tests.browser import console_errors

    stack, base = front
    events = await grpc_events(stack.target, reference_request())
    result = next(iter(collect(events).values()))
    expected_dir = tmp_path / "main_py"
    saved = result.save_wavs(expected_dir)  # what main.py writes (the same client code, the same seeds)
    assert len(saved) >= 2

    def drive() -> dict:
        driver = chromium
        driver.get(base + "/")
        driver.find_element(By.CSS_SELECTOR, "details summary").click()  # the settings
        for field, value in (("seconds", "1"), ("steps", "2"), ("seed", "7"), ("vlm-seed", "1")):
            element = driver.find_element(By.ID, field)
            element.clear()
            element.send_keys(value)
        driver.find_element(By.ID, "token").send_keys(TOKEN)
        driver.find_element(By.ID, "photo").send_keys(str(PHOTO))
        driver.find_element(By.ID, "go").click()
        WebDriverWait(driver, WAIT).until(lambda d: d.execute_script("return window.i2s.done || !!window.i2s.error"))
        state = driver.execute_script("return window.i2s")
        state["scene_text"] = driver.find_element(By.ID, "scene").text
        state["players"] = len(driver.find_elements(By.CSS_SELECTOR, "#clips .clip audio"))
        state["box_labels"] = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#boxes .box span")]
        state["levels"] = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#clips .clip .level")]
        driver.find_element(By.ID, "scene-mix").click()
        WebDriverWait(driver, WAIT).until(lambda d: (driver.i2s_downloads / "scene_mix.wav").exists())
        links = driver.find_elements(By.CSS_SELECTOR, "#clips .clip a.wav")
        state["links"] = [link.get_attribute("download") for link in links]
        links[0].click()
        first = driver.i2s_downloads / state["links"][0]
        WebDriverWait(driver, WAIT).until(lambda d: first.exists())
        driver.find_element(By.ID, "description-json").click()
        WebDriverWait(driver, WAIT).until(lambda d: (driver.i2s_downloads / "description.json").exists())
        driver.execute_script("window.scrollTo(0, 0)")
        driver.save_screenshot(str(tmp_path / "http-page.png"))
        state["console_errors"] = console_errors(driver)
        return state

    state = await asyncio.to_thread(drive)
    assert state["error"] is None and state["done"]
    assert state["scene_text"] and state["scene_text"] == result.scene
    assert state["players"] == len(result.clips) == len(state["clips"])
    assert state["firstPlayContextState"] == "running"
    assert state["firstPlayAt"] < state["lastClipDoneAt"]  # playing began while clips were still being made
    first = state["links"][0]
    assert (chromium.i2s_downloads / first).read_bytes() == (expected_dir / first).read_bytes()
    description = json.loads((chromium.i2s_downloads / "description.json").read_text())
    assert description["scene"] == result.description.scene
    # Each located source's box is drawn with its name; every clip shows its loudness; the mix is stereo and
    # byte for byte what main.py writes.
    located = [s.name for s in result.description.sources if s.HasField("location")]
    assert located and state["box_labels"] == located
    assert len(state["levels"]) == len(result.clips) and all("LUFS" in t or "silent" in t for t in state["levels"])
    assert any("stereo" in t for t in state["levels"])
    assert (chromium.i2s_downloads / "scene_mix.wav").read_bytes() == (expected_dir / "scene_mix.wav").read_bytes()
    assert state["console_errors"] == []
    keep = os.environ.get("I2S_HTTP_PAGE_SCREENSHOT")  # docs/screenshots/http-page.png was made this way
    if keep:
        shutil.copyfile(tmp_path / "http-page.png", keep)


async def test_page_says_the_models_are_loading_and_enables_its_button_when_they_serve(chromium):
    """Before the orchestrator serves, the page says the models are still loading and its button stays off
    (a click would only end in 'unavailable'); once it serves, the button turns on by itself."""
    from gateway.front import HttpFront
    from gateway.options import HttpOptions
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from serving.server import GrpcServer

    grpc_server = GrpcServer(ServerOptions(host="127.0.0.1", port=0, grace_seconds=0.5), lambda s: None, [])
    await grpc_server.start()
    await grpc_server.set_serving(False)
    http = HttpFront(HttpOptions(http_port=0), ServerOptions(port=0), grpc_server.address)
    await http.start()
    try:
        def loading() -> tuple[str, bool]:
            chromium.get(f"http://127.0.0.1:{http.port}/")
            WebDriverWait(chromium, WAIT).until(  # said before any photo is chosen
                lambda d: "still loading" in d.find_element(By.ID, "status").text)
            chromium.find_element(By.ID, "photo").send_keys(str(PHOTO))
            return chromium.find_element(By.ID, "status").text, chromium.find_element(By.ID, "go").is_enabled()

        status, enabled = await asyncio.to_thread(loading)
        assert "models are still loading" in status and not enabled
        await grpc_server.set_serving(True)

        def ready() -> tuple[str, bool]:
            WebDriverWait(chromium, WAIT).until(lambda d: d.find_element(By.ID, "go").is_enabled())
            return chromium.find_element(By.ID, "status").text, chromium.execute_script("return window.i2s.serving")

        status, serving = await asyncio.to_thread(ready)
        assert serving and "ready" in status
    finally:
        await http.stop()
        await grpc_server.stop()
