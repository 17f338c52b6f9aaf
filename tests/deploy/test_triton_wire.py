"""The Triton backends' configuration and wire formats, without a server: flags to backend, and each
message through the tensors both ends share (the models in deploy/triton use the same functions)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from audio_service.backend import AudioRequest, AudioResult
from image_to_sound.v1 import common_pb2
from serving.errors import InvalidInput, NotReady
from vlm_service.backend import DecodingOptions, DescriptionDone, SceneHeader, SourceFound


def test_the_flags_pick_the_triton_backends():
    from audio_service import config as audio_config, server as audio_server
    from audio_service.triton_backend import TritonAudioBackend
    from vlm_service import config as vlm_config, server as vlm_server
    from vlm_service.triton_backend import TritonVisionBackend

    vlm = vlm_server.build_backend(vlm_config.parse_args(["--backend", "triton", "--triton-url", "triton:8001"]))
    assert isinstance(vlm, TritonVisionBackend) and (vlm.url, vlm.model_name) == ("triton:8001", "vlm")
    audio = audio_server.build_backend(audio_config.parse_args(
        ["--backend", "triton", "--triton-url", "triton:9001", "--triton-model", "audioldm2"]))
    assert isinstance(audio, TritonAudioBackend) and (audio.url, audio.model_name) == ("triton:9001", "audioldm2")
    assert not vlm.ready and not audio.ready  # nothing connects before load()


def test_vlm_events_survive_the_wire():
    from vlm_service.triton_backend import decode_event, encode_event

    source = common_pb2.SoundSource(id="s1", name="kettle", material="steel",
                                    variants=[common_pb2.SoundVariant(id="s1v1", action="whistling")])
    events = [
        SceneHeader(scene="a kitchen", mood="calm"),
        SourceFound(source),
        DescriptionDone(description=common_pb2.SceneDescription(scene="a kitchen", sources=[source]),
                        prompt_tokens=90, output_tokens=300, time_to_first_token_seconds=0.25, total_seconds=2.5,
                        finish_reason="length"),
    ]
    assert [decode_event(*encode_event(e)) for e in events] == events


@pytest.mark.parametrize("error, expected", [(InvalidInput("too small"), InvalidInput), (ValueError("top_p"), ValueError),
                                             (NotReady("closed"), NotReady), (KeyError("x"), RuntimeError)])
def test_vlm_errors_come_back_as_the_same_exception(error, expected):
    from vlm_service.triton_backend import decode_event, encode_error

    with pytest.raises(expected) as raised:
        decode_event(*encode_error(error))
    assert type(raised.value) is expected and str(error) in str(raised.value)


def test_vlm_inputs_carry_the_pixels_and_options():
    from vlm_service.triton_backend import IMAGE, LOCATE_SOURCES, SEED, options_from_arrays, request_arrays

    image = Image.fromarray(np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3))
    for options in (DecodingOptions(max_new_tokens=77, temperature=0.5, top_p=0.75, seed=2**62),
                    DecodingOptions(max_new_tokens=5), DecodingOptions(locate_sources=True)):
        arrays = request_arrays(image, options)
        assert np.array_equal(arrays[IMAGE], np.asarray(image)) and (SEED in arrays) == (options.seed is not None)
        assert (LOCATE_SOURCES in arrays) == options.locate_sources
        assert options_from_arrays(arrays) == options


def test_vlm_inputs_carry_batch_priority_and_only_then_name_it():
    from serving.priority import BATCH, INTERACTIVE
    from vlm_service.triton_backend import PRIORITY, priority_from_arrays, request_arrays

    image = Image.new("RGB", (6, 4))
    interactive = request_arrays(image, DecodingOptions(), INTERACTIVE)
    assert PRIORITY not in interactive  # an older model (no such input) still takes interactive work
    assert priority_from_arrays(interactive) == INTERACTIVE
    assert priority_from_arrays(request_arrays(image, DecodingOptions(), BATCH)) == BATCH
    with pytest.raises(ValueError, match="PRIORITY='urgent'"):
        priority_from_arrays({PRIORITY: np.array([b"urgent"], dtype=np.object_)})


def test_audio_requests_and_results_survive_the_tensors():
    from audio_service.triton_backend import (request_arrays, requests_from_arrays, result_arrays,
                                              results_from_arrays)

    requests = [AudioRequest(prompt="a dog barks, then rain — ünïcode", duration_seconds=2.5, num_inference_steps=20,
                             guidance_scale=3.5, seed=2**63 - 1, negative_prompt="music", num_candidates=2,
                             scheduler="ddim"),
                AudioRequest(prompt="rain", duration_seconds=2.5)]
    assert requests_from_arrays(request_arrays(requests)) == requests
    results = [AudioResult(waveform=np.linspace(-1, 1, 40000, dtype=np.float32), sample_rate_hertz=16000,
                           score=0.25, steps_run=20, scheduler="ddim", model_id="cvssp/audioldm2", candidate_index=1),
               AudioResult(waveform=np.zeros(40000, np.float32), sample_rate_hertz=16000, score=None, steps_run=20,
                           scheduler="dpm", model_id="cvssp/audioldm2")]
    back = results_from_arrays(result_arrays(results), requests)
    for got, sent, request in zip(back, results, requests):
        assert np.array_equal(got.waveform, sent.waveform)
        assert (got.score, got.steps_run, got.candidate_index, got.model_id, got.sample_rate_hertz) == \
            (sent.score, sent.steps_run, sent.candidate_index, sent.model_id, sent.sample_rate_hertz)
        assert got.scheduler == request.scheduler
