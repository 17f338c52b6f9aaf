"""The audio fast path against the plain path, on the tiny real AudioLDM2 (CPU, fixed seeds), and the model thread.

Tolerance: atol 1e-4 on audio whose RMS is ~0.1. Per-caption encoding and batching change the order of
float operations (padded, masked T5 states; other batch shapes); where the plain pipeline itself pads
(prompts of different T5 lengths, or a negative prompt of another length than the prompt's), its audio
depends on its batch-mates, so comparisons with it use captions of one T5 length.
"""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from audio_service.backend import AudioRequest, BackendCancelled, num_samples
from audio_service.batching import Batcher
from audio_service.diffusers_backend import DiffusersAudioBackend, bucket_for
from audio_service.server import load_and_warm

SR = 16000
ENCODING_ATOL = 1e-4


def req(prompt: str = "Rain drumming on a tin roof", **kw) -> AudioRequest:
    kw.setdefault("duration_seconds", 1.0)
    kw.setdefault("num_inference_steps", 3)
    kw.setdefault("seed", 7)
    return AudioRequest(prompt=prompt, **kw)


def t5_length(backend: DiffusersAudioBackend, text: str) -> int:
    return len(backend.pipeline.tokenizer_2(text).input_ids)


def same_t5_length_pair(backend: DiffusersAudioBackend) -> tuple[str, str, str]:
    """Two prompts and a negative prompt with one T5 length, so the plain pipeline pads nothing."""
    texts = ["A dog barks while rain falls", "Waves break on a sandy beach", "A kettle whistles on a stove",
             "Birds chirp in a park", "A door creaks open slowly", "Keys jingle on a ring", "music and singing",
             "speech and talking voice", "low quality noise", "static hum"]
    by_length: dict[int, list[str]] = {}
    for t in texts:
        by_length.setdefault(t5_length(backend, t), []).append(t)
    group = max(by_length.values(), key=len)
    assert len(group) >= 3, by_length
    return group[0], group[1], group[2]


@pytest.fixture(scope="module")
def cached_backend(tiny_audio_dir):
    backend = DiffusersAudioBackend(str(tiny_audio_dir), device="cpu", prompt_cache_size=2)
    backend.load()
    yield backend
    backend.close()


def test_buckets_parse_once_and_pick_the_smallest_that_holds():
    from audio_service.config import parse_args

    # Parsed by the flag (the one parser of comma lists), checked by the flag and by the backend alike.
    assert sorted(parse_args(["--duration-buckets", "10, 4,30"]).duration_buckets) == [4.0, 10.0, 30.0]
    assert DiffusersAudioBackend("unused", device="cpu", duration_buckets=(10.0, 4.0, 30.0)).duration_buckets == (4.0, 10.0, 30.0)
    assert bucket_for(3.2, (4.0, 10.0)) == 4.0 and bucket_for(4.0, (4.0, 10.0)) == 4.0
    assert bucket_for(12.0, (4.0, 10.0)) == 12.0 and bucket_for(2.5, ()) == 2.5
    with pytest.raises(SystemExit):
        parse_args(["--duration-buckets", "4,-1"])
    with pytest.raises(ValueError, match="positive seconds"):
        DiffusersAudioBackend("unused", device="cpu", duration_buckets=(4.0, -1.0))


def test_a_request_padded_to_its_bucket_is_the_bucket_clip_trimmed(tiny_audio_dir, tiny_audio_backend):
    bucketed = DiffusersAudioBackend(str(tiny_audio_dir), device="cpu", duration_buckets=(2.0,), prompt_cache_size=8)
    bucketed.load()
    try:
        prompt, other, negative = same_t5_length_pair(tiny_audio_backend)
        short = bucketed.generate([req(prompt, negative_prompt=negative, duration_seconds=1.3)])[0]
        assert short.waveform.shape == (num_samples(1.3, SR),)
        # The plain path at the bucket's length (2 s rounded up to whole UNet blocks), trimmed: the same clip.
        generated = bucketed.generation_samples(req(duration_seconds=1.3))
        assert generated >= 2 * SR and generated == bucketed.generation_samples(req(duration_seconds=2.0))
        whole = tiny_audio_backend.generate([req(prompt, negative_prompt=negative,
                                                 duration_seconds=generated / SR)])[0]
        np.testing.assert_allclose(short.waveform, whole.waveform[: num_samples(1.3, SR)], atol=ENCODING_ATOL)

        # One bucket, one batch: different durations share a call and each gets its own length back.
        a = req(prompt, negative_prompt=negative, duration_seconds=1.3)
        b = req("Waves break on a sandy beach with seagulls calling", duration_seconds=1.7, seed=3)
        assert bucketed.batch_key(a) == bucketed.batch_key(b) and a.batch_key() != b.batch_key()
        together = bucketed.generate([a, b])
        assert [r.waveform.shape[0] for r in together] == [num_samples(1.3, SR), num_samples(1.7, SR)]
        np.testing.assert_allclose(together[0].waveform, short.waveform, atol=ENCODING_ATOL)
        alone_b = bucketed.generate([b])[0]
        np.testing.assert_allclose(together[1].waveform, alone_b.waveform, atol=ENCODING_ATOL)
    finally:
        bucketed.close()


def test_cached_encodings_give_the_plain_pipelines_audio(cached_backend, tiny_audio_backend):
    prompt, other, negative = same_t5_length_pair(tiny_audio_backend)
    for request in (req(prompt, negative_prompt=negative), req(prompt, negative_prompt=negative, num_candidates=2)):
        plain = tiny_audio_backend.generate_candidates([request])[0]
        cached = cached_backend.generate_candidates([request])[0]
        np.testing.assert_allclose(cached.waveforms, plain.waveforms, atol=ENCODING_ATOL)
    # A batch of two prompts of one length, same negative: no padding in the plain path either.
    batch = [req(prompt, negative_prompt=negative), req(other, negative_prompt=negative, seed=9)]
    plain = tiny_audio_backend.generate(batch)
    cached = cached_backend.generate(batch)
    for p, c in zip(plain, cached):
        np.testing.assert_allclose(c.waveform, p.waveform, atol=ENCODING_ATOL)


def test_the_encoding_cache_is_an_lru_of_captions(cached_backend):
    cached_backend.generate([req("A clock ticks", negative_prompt="music")])  # 2 captions in, cache full
    before = cached_backend.encode_calls
    cached_backend.generate([req("A clock ticks", negative_prompt="music", seed=1)])
    assert cached_backend.encode_calls == before  # both hit
    cached_backend.generate([req("A bell rings", negative_prompt="music")])  # evicts "A clock ticks"
    assert cached_backend.encode_calls == before + 1
    cached_backend.generate([req("A clock ticks", negative_prompt="music")])
    assert cached_backend.encode_calls == before + 2


def test_with_cached_encodings_a_clip_does_not_depend_on_its_batch_mates(cached_backend):
    short, long = req("A dog barks", seed=4), req("Heavy rain drumming on a metal roof with thunder far away", seed=5)
    assert t5_length(cached_backend, short.prompt) != t5_length(cached_backend, long.prompt)
    together = cached_backend.generate([short, long])
    for request, clip in zip((short, long), together):
        np.testing.assert_allclose(clip.waveform, cached_backend.generate([request])[0].waveform, atol=ENCODING_ATOL)


def test_the_gpt2_loop_reuses_its_kv_cache(tiny_audio_backend):
    """AudioLDM2's 8-step GPT-2 loop feeds the whole prompt once, then one token per step with the cache
    (transformers 5.17, diffusers 0.42.1). Were it to recompute the sequence, this fails."""
    pipe = tiny_audio_backend.pipeline
    seen: list[tuple[int, bool]] = []
    hook = pipe.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs["inputs_embeds"].shape[1], kwargs.get("past_key_values") is not None)),
        with_kwargs=True,
    )
    try:
        tiny_audio_backend.worker.run(pipe.encode_prompt, ["A dog barks"], "cpu", 1, False)
    finally:
        hook.remove()
    assert len(seen) == 8
    assert seen[0][0] > 1 and not seen[0][1]
    assert seen[1:] == [(1, True)] * 7


@pytest.mark.timeout(900)  # dynamo traces the tiny UNet in about a minute on an idle CPU, longer on a busy one
def test_compiled_path_is_warmed_on_every_bucket_and_batch_size_and_matches_plain(tiny_audio_dir, tiny_audio_backend):
    """torch.compile through dynamo (the aot_eager backend: traced graphs, eager kernels; Inductor's C++
    build is too slow for CPU tests). T5 states are padded to the fixed length, masked."""
    # One batch size: each traced shape costs about a minute on CPU (the GPU warm-up covers all of them).
    compiled = DiffusersAudioBackend(str(tiny_audio_dir), device="cpu", compile="aot_eager", duration_buckets=(1.0,),
                                     warmup_batch_sizes=(1,), self_check=True)
    compiled.load()
    try:
        compiled.warmup()
        assert compiled.warmed_shapes == [(1.0, 1)]
        # The self-check (compiled UNet against eager, one step, same latents) passed: the compiled UNet serves.
        assert compiled.serving_path == "compiled" and compiled.serving_path_reason is None
        unguided = req(guidance_scale=1.0)  # half the UNet batch: warmed too, so it compiles nothing new
        assert compiled.generate([unguided])[0].waveform.shape == (num_samples(1.0, SR),)
        prompt, _, negative = same_t5_length_pair(tiny_audio_backend)
        request = req(prompt, negative_prompt=negative)
        plain = req(prompt, negative_prompt=negative, duration_seconds=compiled.generation_samples(request) / SR)
        np.testing.assert_allclose(compiled.generate([request])[0].waveform,
                                   tiny_audio_backend.generate([plain])[0].waveform[: num_samples(1.0, SR)],
                                   atol=ENCODING_ATOL)
    finally:
        compiled.close()


class _Fail(Exception):
    pass


@pytest.mark.asyncio
async def test_every_model_call_runs_on_the_backends_one_thread(tiny_audio_dir):
    backend = DiffusersAudioBackend(str(tiny_audio_dir), device="cpu", prompt_cache_size=4)
    threads: dict[str, set[int]] = {}

    def record(what: str) -> None:
        threads.setdefault(what, set()).add(threading.get_ident())

    original_load = backend._load
    backend._load = lambda: (record("load"), original_load())[1]
    await asyncio.to_thread(load_and_warm, backend)  # as the service starts it: from a pool thread
    model_thread = backend.worker.submit(threading.get_ident).result()  # the worker's one thread
    fail_next = threading.Event()

    def unet_hook(module, args, kwargs):
        record("unet")
        if fail_next.is_set():
            fail_next.clear()
            raise _Fail("injected")

    hook = backend.pipeline.unet.register_forward_pre_hook(unet_hook, with_kwargs=True)
    encoder_hook = backend.pipeline.text_encoder_2.register_forward_pre_hook(lambda *a: record("encode"))
    batcher = Batcher(backend, max_batch_size=4, max_wait_ms=50)
    try:
        results = await asyncio.gather(*(batcher.submit(req(f"sound {i}", seed=i)) for i in range(3)))
        assert len(results) == 3
        fail_next.set()
        with pytest.raises(_Fail):
            await batcher.submit(req("this one fails"))
        # A cancelled request: the caller leaves at the first step, the loop stops there.
        stepped = asyncio.Event()
        job = asyncio.ensure_future(batcher.submit(req("long one", num_inference_steps=50),
                                                   on_step=lambda done, total: stepped.set()))
        await asyncio.wait_for(stepped.wait(), 60)
        job.cancel()
        await asyncio.wait_for(batcher.wait_idle(), 60)
        assert batcher.last_stopped_early is not None and batcher.last_stopped_early[0] < 50
        with pytest.raises(BackendCancelled):
            backend.generate([req()], should_stop=lambda: True)
        await batcher.submit(req("after all that"))
        backend.score_candidates(["rain"], np.zeros((1, 2, SR), np.float32))
    finally:
        hook.remove()
        encoder_hook.remove()
        await batcher.close()
        await asyncio.to_thread(backend.close)
    assert model_thread != threading.get_ident()
    assert set(threads) == {"load", "unet", "encode"}
    assert all(idents == {model_thread} for idents in threads.values()), threads


def test_nan_audio_fails_its_clip_with_a_message_and_a_count_and_its_batch_mate_is_served(tiny_audio_backend):
    """A clip whose samples come out NaN (float16 overflow on a GPU, here a hook on the vocoder) fails on its
    own instead of going out as silence; the other clip of the batch is unchanged."""
    from prometheus_client import REGISTRY

    from audio_service.backend import AudioResult, NonFiniteAudio

    before = REGISTRY.get_sample_value("i2s_audio_nonfinite_clips_total") or 0.0
    requests = [req("A dog barks", seed=1), req("Waves break", seed=2)]
    expected = tiny_audio_backend.generate(requests)[1].waveform

    def poison_first_clip(module, inputs, output):
        output[0] = float("nan")
        return output

    hook = tiny_audio_backend.pipeline.vocoder.register_forward_hook(poison_first_clip)
    try:
        results = tiny_audio_backend.generate(requests)
    finally:
        hook.remove()
    assert isinstance(results[0], NonFiniteAudio) and "NaN or infinite" in str(results[0])
    assert isinstance(results[1], AudioResult)
    np.testing.assert_array_equal(results[1].waveform, expected)
    assert REGISTRY.get_sample_value("i2s_audio_nonfinite_clips_total") == before + 1


def test_a_compile_failing_at_warm_up_serves_the_eager_unet(tiny_audio_dir, monkeypatch, caplog):
    from audio_service import diffusers_backend
    from prometheus_client import REGISTRY

    def failing_backend(graph, example_inputs):
        raise RuntimeError("inductor failed (a forced failure)")

    monkeypatch.setattr(diffusers_backend, "compile_options", lambda mode: {"backend": failing_backend})
    backend = DiffusersAudioBackend(str(tiny_audio_dir), device="cpu", compile="default", duration_buckets=(1.0,),
                                    self_check=True)
    try:
        with caplog.at_level("ERROR"):
            load_and_warm(backend)
        assert backend.serving_path == "eager" and "forced failure" in backend.serving_path_reason
        assert any("serving the eager UNet" in r.getMessage() for r in caplog.records)
        assert REGISTRY.get_sample_value("i2s_fast_path", {"service": "audio", "path": "eager"}) == 1.0
        assert backend.generate([req()])[0].waveform.shape == (SR,)
    finally:
        backend.close()
