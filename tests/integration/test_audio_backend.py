"""The production AudioLDM2 loader and backend on the tiny checkpoint (real classes, random weights, CPU)."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import math

import numpy as np
import pytest

from audio_service.backend import AudioRequest, BackendCancelled, num_samples
from audio_service.batching import Batcher
from serving.errors import InvalidInput
from tiny_models.audio import REAL_MODEL_INDEX_CLASSES

SR = 16000


def req(prompt: str = "Rain drumming on a tin roof", **kw) -> AudioRequest:
    kw.setdefault("duration_seconds", 1.0)
    kw.setdefault("num_inference_steps", 2)
    kw.setdefault("seed", 0)
    return AudioRequest(prompt=prompt, **kw)


def test_tiny_checkpoint_mirrors_the_real_layout(tiny_audio_dir, tiny_audio_backend):
    index = json.loads((tiny_audio_dir / "model_index.json").read_text())
    assert index["_class_name"] == "AudioLDM2Pipeline"
    assert {k: index[k] for k in REAL_MODEL_INDEX_CLASSES} == REAL_MODEL_INDEX_CLASSES
    assert len(REAL_MODEL_INDEX_CLASSES) == 11 and index["language_model"] == ["transformers", "GPT2Model"]
    assert all((tiny_audio_dir / name).is_dir() for name in REAL_MODEL_INDEX_CLASSES)
    vocoder = json.loads((tiny_audio_dir / "vocoder" / "config.json").read_text())
    assert vocoder["sampling_rate"] == SR and math.prod(vocoder["upsample_rates"]) == 160
    size = sum(f.stat().st_size for f in tiny_audio_dir.rglob("*") if f.is_file())
    assert size < 20 * 2**20

    # The loader replaced GPT2Model (no generation helpers in transformers 5.x) with GPT2LMHeadModel.
    pipe = tiny_audio_backend.pipeline
    assert type(pipe.language_model).__name__ == "GPT2LMHeadModel"
    assert hasattr(pipe.language_model, "_update_model_kwargs_for_generation")
    assert pipe.language_model.lm_head.weight.data_ptr() == pipe.language_model.transformer.wte.weight.data_ptr()
    assert type(pipe.text_encoder).__name__ == "ClapModel" and type(pipe.text_encoder_2).__name__ == "T5EncoderModel"
    assert tiny_audio_backend.sample_rate_hertz == SR and tiny_audio_backend.dtype.is_floating_point


def test_the_plain_loader_hits_the_gpt2_quirk(tiny_audio_dir):
    """Why the loader swaps the language model: the model_index.json layout (like the real one) gives a
    GPT2Model, which the pipeline cannot drive on transformers 5.x (diffusers #12630)."""
    from diffusers import AudioLDM2Pipeline

    plain = AudioLDM2Pipeline.from_pretrained(tiny_audio_dir)
    assert type(plain.language_model).__name__ == "GPT2Model"
    with pytest.raises(AttributeError, match="_update_model_kwargs_for_generation"):
        plain("rain", num_inference_steps=1, audio_length_in_s=1.0)


def test_tiny_tokenizers_are_deterministic():
    from tiny_models.audio import _train_roberta_tokenizer, _train_t5_tokenizer

    for train in (_train_roberta_tokenizer, _train_t5_tokenizer):
        assert train().backend_tokenizer.to_str() == train().backend_tokenizer.to_str()


def test_generates_a_clip_of_exact_length(tiny_audio_backend):
    request = req(duration_seconds=1.2345, num_inference_steps=3, seed=7)  # 19752 samples: not whole frames
    [result] = tiny_audio_backend.generate([request])
    wave = result.waveform
    assert wave.shape == (round(1.2345 * SR),) == (num_samples(1.2345, SR),)
    assert wave.dtype == np.float32
    assert np.all(np.isfinite(wave)) and np.any(wave != 0)
    assert result.sample_rate_hertz == SR and result.steps_run == 3 and result.scheduler == "dpm"
    assert result.model_id == tiny_audio_backend.model_id
    # One candidate is scored too, by the function that ranks candidates (the clip's quality number).
    [[expected]] = tiny_audio_backend.score_candidates([request.prompt], wave[None, None])
    assert -1.0 <= result.score <= 1.0 and result.score == pytest.approx(float(expected), abs=1e-6)


def test_same_seed_same_bytes_different_seed_different_audio(tiny_audio_backend):
    a = tiny_audio_backend.generate([req(seed=123)])[0].waveform
    b = tiny_audio_backend.generate([req(seed=123)])[0].waveform
    c = tiny_audio_backend.generate([req(seed=124)])[0].waveform
    assert a.tobytes() == b.tobytes()
    assert not np.allclose(a, c)


def test_ddim_scheduler_and_no_guidance(tiny_audio_backend):
    [result] = tiny_audio_backend.generate([req(scheduler="ddim", num_inference_steps=3, guidance_scale=1.0)])
    assert result.scheduler == "ddim" and result.steps_run == 3
    assert result.waveform.shape == (SR,) and np.all(np.isfinite(result.waveform))


def test_batched_requests_get_their_own_clips(tiny_audio_backend):
    requests = [req("Dog barking in a backyard", seed=1), req("Kettle whistling in a kitchen", seed=2, negative_prompt="music")]
    results = tiny_audio_backend.generate(requests)
    assert [r.waveform.shape for r in results] == [(SR,), (SR,)]
    assert not np.allclose(results[0].waveform, results[1].waveform)
    again = tiny_audio_backend.generate(requests)  # the same batch again: the same bytes
    assert [r.waveform.tobytes() for r in again] == [r.waveform.tobytes() for r in results]


def test_candidates_are_ranked_per_prompt(tiny_audio_backend):
    """2 requests x 3 candidates in one pipeline call; each keeps the best of ITS OWN candidates.

    Both requests use the same text, so their CLAP text embeddings are identical: ranking across the
    whole batch (the pipeline's score_waveforms, diffusers #13602) would hand both requests the same
    globally best waveform, which belongs to only one of them, and this test would fail.
    """
    requests = [req("Footsteps crunching on gravel", seed=s, num_candidates=3) for s in (1, 2)]
    candidates = tiny_audio_backend.generate_candidates(requests)
    results = tiny_audio_backend.generate(requests)
    assert [c.waveforms.shape for c in candidates] == [(3, SR), (3, SR)]
    for i, (result, own) in enumerate(zip(results, candidates)):
        other = candidates[1 - i]
        best = int(np.argmax(own.scores))
        assert result.candidate_index == best
        assert result.waveform.tobytes() == own.waveforms[best].tobytes()
        assert result.score == pytest.approx(float(own.scores[best]))
        assert -1.0 <= result.score <= 1.0
        assert all(result.waveform.tobytes() != w.tobytes() for w in other.waveforms)
    assert results[0].waveform.tobytes() != results[1].waveform.tobytes()

    # Different prompts in one batch: still each from its own candidates.
    mixed = [req("Dog barking", seed=3, num_candidates=3), req("Waves crashing on rocks", seed=4, num_candidates=3)]
    mixed_candidates = tiny_audio_backend.generate_candidates(mixed)
    for result, own in zip(tiny_audio_backend.generate(mixed), mixed_candidates):
        assert any(result.waveform.tobytes() == w.tobytes() for w in own.waveforms)


def test_should_stop_cancels_between_steps(tiny_audio_backend):
    steps: list[tuple[int, int]] = []
    with pytest.raises(BackendCancelled) as info:
        tiny_audio_backend.generate(
            [req(num_inference_steps=10)], on_step=lambda done, total: steps.append((done, total)),
            should_stop=lambda: len(steps) >= 2,
        )
    assert info.value.steps_run == 2 < 10
    assert steps == [(1, 10), (2, 10)]
    with pytest.raises(BackendCancelled) as before:
        tiny_audio_backend.generate([req()], should_stop=lambda: True)
    assert before.value.steps_run == 0
    # The backend is still usable afterwards.
    assert tiny_audio_backend.generate([req()])[0].steps_run == 2


def test_progress_is_reported_every_step(tiny_audio_backend):
    steps: list[tuple[int, int]] = []
    tiny_audio_backend.generate([req(num_inference_steps=4)], on_step=lambda d, t: steps.append((d, t)))
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]


BAD = [
    (dict(duration_seconds=0.5), "duration_seconds"),
    (dict(duration_seconds=300.5), "duration_seconds"),
    (dict(duration_seconds=1.5, loop=True), "loop needs a clip of at least 2 s"),
    (dict(reject_speech_music=-1), "reject_speech_music"),
    (dict(reject_speech_music=9), "reject_speech_music"),
    (dict(duration_seconds=float("nan")), "duration_seconds"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(num_inference_steps=1001), "num_inference_steps"),
    (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(guidance_scale=float("inf")), "guidance_scale"),
    (dict(guidance_scale=-1.0), "guidance_scale"),
    (dict(guidance_scale=31.0), "guidance_scale"),
    (dict(num_candidates=0), "num_candidates"),
    (dict(num_candidates=9), "num_candidates"),
    (dict(prompt="   "), "prompt"),
    (dict(scheduler="euler"), "scheduler"),
    (dict(seed=-1), "seed"),
]


@pytest.mark.parametrize("change,field", BAD, ids=[f"{f}={list(c.values())[0]}" for c, f in BAD])
def test_invalid_requests_cannot_be_made(change, field):
    """The backend never sees a bad request: the contract's type refuses to hold one."""
    with pytest.raises(InvalidInput, match=field):
        dataclasses.replace(req(), **change)


def test_incompatible_batch_is_rejected(tiny_audio_backend):
    with pytest.raises(ValueError, match="share"):
        tiny_audio_backend.generate([req(), req(duration_seconds=2.0)])


def test_warmup(tiny_audio_backend):
    tiny_audio_backend.warmup()
    assert tiny_audio_backend.ready


@pytest.mark.asyncio
async def test_batcher_with_the_real_backend(tiny_audio_backend):
    batcher = Batcher(tiny_audio_backend, max_batch_size=4, max_wait_ms=1000)
    prompts = ["Dog barking", "Door creaking open", "Kettle whistling", "Glass bottles clinking"]
    requests = [req(p, seed=i, duration_seconds=1.5) for i, p in enumerate(prompts)]
    results = await asyncio.gather(*(batcher.submit(r) for r in requests))
    await batcher.close()
    assert batcher.backend_calls == 1 < len(requests)
    assert all(r.waveform.shape == (24000,) and r.waveform.dtype == np.float32 for r in results)
    assert len({r.waveform.tobytes() for r in results}) == 4
    direct = tiny_audio_backend.generate(requests)  # the same batch, called directly: the same clips, in order
    assert [r.waveform.tobytes() for r in direct] == [r.waveform.tobytes() for r in results]


def test_step_bounds_follow_what_each_scheduler_can_run(tiny_audio_dir):
    """DPM-Solver's largest accepted step count runs to a finite result on the checkpoint's scheduler
    config; one more is refused up front (at 1000, diffusers' DPM scheduler raises IndexError)."""
    import torch
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from i2s_formats.contract import MAX_STEPS_BY_SCHEDULER

    base = DDIMScheduler.from_pretrained(tiny_audio_dir, subfolder="scheduler").config
    most = MAX_STEPS_BY_SCHEDULER["dpm"]
    scheduler = DPMSolverMultistepScheduler.from_config(base)
    scheduler.set_timesteps(most)
    x = torch.randn(1, 8, 16, 4, generator=torch.Generator().manual_seed(0))
    for t in scheduler.timesteps:
        x = scheduler.step(torch.randn_like(x), t, x).prev_sample
    assert torch.isfinite(x).all()
    request = AudioRequest(prompt="rain on a tin roof", num_inference_steps=most, scheduler="dpm")
    with pytest.raises(ValueError, match="dpm scheduler takes at most"):
        dataclasses.replace(request, num_inference_steps=most + 1)
    dataclasses.replace(request, num_inference_steps=1000, scheduler="ddim")
