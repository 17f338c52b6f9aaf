"""AudioLDM2 in process, through diffusers: the loader users take for `cvssp/audioldm2` (and `-large`).

What this adds to a plain `AudioLDM2Pipeline.from_pretrained`:
- transformers 5.x: `GPT2Model` (what the checkpoint's model_index.json names) lacks
  `_update_model_kwargs_for_generation`, which the pipeline calls. The language model is loaded as
  `GPT2LMHeadModel` from the same folder (the GPT2Model weights load into it cleanly; its lm_head is
  tied to the embeddings) and passed in (diffusers #12630).
- Candidates are ranked per prompt with CLAP here. The pipeline's own `score_waveforms` ranks across
  the whole batch when several prompts are batched (diffusers #13602), so it is switched off.
- One CPU `torch.Generator` per (request, candidate): a request's noise depends only on its own seed,
  and is the same on any device.
- DPM-Solver++ (20-25 steps) by default; DDIM (the seed's 200-step setting) on request.
- Progress and cancellation through the pipeline's per-step `callback` (diffusers 0.42.1's AudioLDM2
  has `callback`/`callback_steps`, not `callback_on_step_end`).
"""
from __future__ import annotations

import gc
import logging
import math
import os
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from audio_service.backend import (
    AudioBackend,
    AudioRequest,
    AudioResult,
    BackendCancelled,
    BackendNotLoaded,
    StepCallback,
    StopCheck,
    check_batch,
    num_samples,
    validate,
)

__all__ = ["DiffusersAudioBackend", "Candidates", "candidate_seed", "fit_length", "resample", "validate"]

log = logging.getLogger(__name__)

_DTYPES = {"float16": "float16", "fp16": "float16", "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float32": "float32", "fp32": "float32", "float": "float32"}


@dataclass(frozen=True, eq=False)
class Candidates:
    """All candidates generated for one request, in generation order."""

    waveforms: np.ndarray  # (num_candidates, num_samples) float32
    scores: np.ndarray | None  # (num_candidates,) CLAP cosine similarity to the request's prompt; None if one candidate
    steps_run: int


class _Stop(Exception):
    """Raised inside the pipeline's step callback to leave the denoising loop."""

    def __init__(self, steps_run: int):
        super().__init__(steps_run)
        self.steps_run = steps_run


def candidate_seed(seed: int, index: int) -> int:
    """The generator seed of candidate `index` of a request: `seed` itself for the first candidate."""
    if index == 0:
        return seed
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def fit_length(audio: np.ndarray, n: int) -> np.ndarray:
    """Trims or zero-pads the last axis to exactly n samples (float32)."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.shape[-1] >= n:
        return np.ascontiguousarray(audio[..., :n])
    pad = [(0, 0)] * (audio.ndim - 1) + [(0, n - audio.shape[-1])]
    return np.pad(audio, pad)


def resample(audio: np.ndarray, orig_hertz: int, target_hertz: int) -> np.ndarray:
    """Band-limited (FFT) resampling along the last axis; exact for the integer 16 k → 48 k step CLAP needs."""
    if orig_hertz == target_hertz:
        return np.asarray(audio, dtype=np.float32)
    n = audio.shape[-1]
    m = int(round(n * target_hertz / orig_hertz))
    spectrum = np.fft.rfft(audio, axis=-1)
    keep = min(spectrum.shape[-1], m // 2 + 1)
    out = np.zeros(audio.shape[:-1] + (m // 2 + 1,), dtype=spectrum.dtype)
    out[..., :keep] = spectrum[..., :keep]
    return (np.fft.irfft(out, n=m, axis=-1) * (m / n)).astype(np.float32)


def _resolve_token(token: str | None) -> str | None:
    return token or os.environ.get("HUGGING_FACE_TOKEN") or os.environ.get("HF_TOKEN") or None


class DiffusersAudioBackend(AudioBackend):
    """AudioLDM2Pipeline on one device. `model` is a Hub id (cvssp/audioldm2, cvssp/audioldm2-large) or a local dir."""

    def __init__(
        self,
        model: str,
        device: str | None = None,
        dtype: str | None = None,
        revision: str | None = None,
        token: str | None = None,
        *,
        local_files_only: bool = False,
    ):
        self.model_id = str(model)
        self._device_arg = device
        self._dtype_arg = dtype
        self.revision = revision
        self._token = _resolve_token(token)
        self.local_files_only = local_files_only
        self.sample_rate_hertz = 16000  # replaced by the vocoder's rate on load
        self.device: str | None = None
        self.dtype: Any = None
        self._pipe: Any = None
        self._schedulers: dict[str, Any] = {}
        self._lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._pipe is not None

    @property
    def pipeline(self) -> Any:
        """The loaded AudioLDM2Pipeline (for tests and benchmarks)."""
        if self._pipe is None:
            raise BackendNotLoaded("the audio model is not loaded")
        return self._pipe

    def load(self) -> None:
        if self._pipe is not None:
            return
        import torch
        from diffusers import AudioLDM2Pipeline, DDIMScheduler, DPMSolverMultistepScheduler
        from transformers import GPT2LMHeadModel

        device = self._device_arg or ("cuda" if torch.cuda.is_available() else "cpu")
        if self._dtype_arg is None:
            dtype_name = "float16" if device.startswith("cuda") else "float32"
        elif self._dtype_arg in _DTYPES:
            dtype_name = _DTYPES[self._dtype_arg]
        else:
            raise ValueError(f"dtype={self._dtype_arg!r} is not one of {', '.join(sorted(set(_DTYPES.values())))}")
        dtype = getattr(torch, dtype_name)
        common = dict(revision=self.revision, token=self._token, local_files_only=self.local_files_only)

        log.info("loading %s (revision %s) on %s as %s", self.model_id, self.revision or "default", device, dtype_name)
        language_model = GPT2LMHeadModel.from_pretrained(
            self.model_id, subfolder="language_model", dtype=dtype, **common
        )
        pipe = AudioLDM2Pipeline.from_pretrained(self.model_id, language_model=language_model, dtype=dtype, **common)
        pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        # Ranking happens per prompt in `score_candidates` (diffusers #13602): keep the pipeline's order.
        pipe.score_waveforms = _keep_generation_order

        base = pipe.scheduler.config
        self._schedulers = {
            "dpm": DPMSolverMultistepScheduler.from_config(base),
            "ddim": DDIMScheduler.from_config(base),
        }
        self.sample_rate_hertz = int(pipe.vocoder.config.sampling_rate)
        self.device, self.dtype = device, dtype
        self._pipe = pipe

    def warmup(self) -> None:
        """One tiny generation (1 s, 2 steps, 2 candidates so CLAP scoring is warm too)."""
        self.generate([AudioRequest(prompt="warm up", duration_seconds=1.0, num_inference_steps=2, seed=0,
                                    num_candidates=2)])

    def close(self) -> None:
        with self._lock:
            pipe, self._pipe = self._pipe, None
            self._schedulers = {}
        if pipe is None:
            return
        del pipe
        gc.collect()
        if self.device and self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    # -- generation ------------------------------------------------------------------------------

    def generate(
        self,
        requests: Sequence[AudioRequest],
        *,
        should_stop: StopCheck | None = None,
        on_step: StepCallback | None = None,
    ) -> list[AudioResult]:
        requests = list(requests)
        candidates = self.generate_candidates(requests, should_stop=should_stop, on_step=on_step)
        results = []
        for request, cands in zip(requests, candidates):
            best = 0 if cands.scores is None else int(np.argmax(cands.scores))
            results.append(
                AudioResult(
                    waveform=cands.waveforms[best].copy(),
                    sample_rate_hertz=self.sample_rate_hertz,
                    score=None if cands.scores is None else float(cands.scores[best]),
                    steps_run=cands.steps_run,
                    scheduler=request.scheduler,
                    model_id=self.model_id,
                    candidate_index=best,
                )
            )
        return results

    def generate_candidates(
        self,
        requests: Sequence[AudioRequest],
        *,
        should_stop: StopCheck | None = None,
        on_step: StepCallback | None = None,
    ) -> list[Candidates]:
        """Like `generate`, but returns every candidate of every request with its CLAP score."""
        requests = list(requests)
        check_batch(requests)
        import torch

        first = requests[0]
        total, k = first.num_inference_steps, first.num_candidates
        with self._lock:
            pipe = self.pipeline
            if should_stop is not None and should_stop():
                raise BackendCancelled(0, total)

            n = num_samples(first.duration_seconds, self.sample_rate_hertz)
            hop = int(np.prod(pipe.vocoder.config.upsample_rates))
            frames = math.ceil(n / hop)
            # Half a frame of slack: the pipeline floors audio_length_in_s / hop-seconds to whole frames.
            audio_length_in_s = (frames + 0.5) * hop / self.sample_rate_hertz

            generators = [
                torch.Generator("cpu").manual_seed(candidate_seed(r.seed, i)) for r in requests for i in range(k)
            ]
            negatives = [r.negative_prompt.strip() for r in requests]
            steps_run = 0

            def step_callback(step_index: int, timestep: Any, latents: Any) -> None:
                nonlocal steps_run
                steps_run = step_index + 1
                if on_step is not None:
                    on_step(steps_run, total)
                if should_stop is not None and should_stop():
                    raise _Stop(steps_run)

            pipe.scheduler = self._schedulers[first.scheduler]
            try:
                output = pipe(
                    prompt=[r.prompt.strip() for r in requests],
                    negative_prompt=negatives if any(negatives) else None,
                    audio_length_in_s=audio_length_in_s,
                    num_inference_steps=total,
                    guidance_scale=float(first.guidance_scale),
                    num_waveforms_per_prompt=k,
                    generator=generators,
                    callback=step_callback,
                    callback_steps=1,
                    output_type="np",
                )
            except _Stop as stop:
                raise BackendCancelled(stop.steps_run, total) from None

            audio = fit_length(np.asarray(output.audios), n).reshape(len(requests), k, n)
            if not np.all(np.isfinite(audio)):
                log.warning("non-finite samples in generated audio (dtype %s); replaced by 0", self.dtype)
                audio = np.nan_to_num(audio, nan=0.0, posinf=0.0, neginf=0.0)
            scores = self.score_candidates([r.prompt.strip() for r in requests], audio) if k > 1 else None
        return [
            Candidates(waveforms=audio[b], scores=None if scores is None else scores[b], steps_run=steps_run or total)
            for b in range(len(requests))
        ]

    def score_candidates(self, prompts: Sequence[str], waveforms: np.ndarray) -> np.ndarray:
        """CLAP cosine similarity of each prompt to each of ITS OWN candidates: (B, K) for waveforms (B, K, N).

        One CLAP forward for the whole batch; only the block of each prompt's own candidates is read
        (the pipeline's score_waveforms ranks across the batch instead, diffusers #13602).
        """
        import torch

        pipe = self.pipeline
        b, k, _ = waveforms.shape
        fe = pipe.feature_extractor
        flat = waveforms.reshape(b * k, -1)
        # Keep to CLAP's window (a deterministic centre crop): longer input would make the feature
        # extractor pick a random window (rand_trunc / fusion use numpy's global RNG).
        window = int(fe.max_length_s * self.sample_rate_hertz) if getattr(fe, "max_length_s", None) else flat.shape[-1]
        if flat.shape[-1] > window:
            start = (flat.shape[-1] - window) // 2
            flat = flat[:, start : start + window]
        resampled = resample(flat, self.sample_rate_hertz, fe.sampling_rate)
        features = fe(list(resampled), sampling_rate=fe.sampling_rate, return_tensors="pt").input_features
        tokens = pipe.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=pipe.tokenizer.model_max_length, return_tensors="pt"
        )
        device = pipe.text_encoder.device
        with torch.no_grad():
            out = pipe.text_encoder(
                input_ids=tokens.input_ids.to(device),
                attention_mask=tokens.attention_mask.to(device),
                input_features=features.to(device=device, dtype=pipe.text_encoder.dtype),
            )
            text = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
            audio = torch.nn.functional.normalize(out.audio_embeds.float(), dim=-1)
            similarity = (text @ audio.T).cpu().numpy()  # (B, B*K)
        return np.stack([similarity[i, i * k : (i + 1) * k] for i in range(b)]).astype(np.float32)


def _keep_generation_order(text: Any, audio: Any, num_waveforms_per_prompt: int, device: Any, dtype: Any) -> Any:
    return audio
