"""AudioLDM2 in process, through diffusers: the loader users take for `cvssp/audioldm2` (and `-large`).

What this adds to a plain `AudioLDM2Pipeline.from_pretrained`:
- transformers 5.x: `GPT2Model` (what the checkpoint's model_index.json names) lacks
  `_update_model_kwargs_for_generation`, which the pipeline calls. The language model is loaded as
  `GPT2LMHeadModel` from the same folder (the GPT2Model weights load into it cleanly; its lm_head is
  tied to the embeddings) and passed in (diffusers #12630).
- Every clip gets a CLAP score (`score_candidates`: cosine similarity of the caption's and the clip's CLAP
  embeddings, from the CLAP model inside the checkpoint), and candidates are ranked per prompt by that
  same function. The pipeline's own `score_waveforms` ranks across the whole batch when several prompts
  are batched (diffusers #13602), so it is switched off.
- One CPU `torch.Generator` per (request, candidate): a request's noise depends only on its own seed,
  and is the same on any device.
- DPM-Solver++ (20-25 steps) by default; DDIM (the seed's 200-step setting) on request.
- Progress and cancellation through the pipeline's per-step `callback` (diffusers 0.42.1's AudioLDM2
  has `callback`/`callback_steps`, not `callback_on_step_end`).
- One model thread: every CUDA call (load, warm-up, each generation, CLAP scoring, close) runs on one
  long-lived thread the backend owns, whichever thread calls it. The first `generate` on a new thread
  runs ~3x slower for the whole call (docs/architecture.md "One model thread"), so no request may land
  on a cold one.

The fast path, each part switchable (the defaults are the plain path):
- `prompt_cache_size` > 0: each caption (and negative prompt) is encoded on its own, once (CLAP, T5,
  projection and the 8-step GPT-2 loop), and kept in an LRU; batches are built from the cached
  encodings, the T5 states padded with masked positions. A caption's encoding then no longer depends on
  its batch-mates (the plain pipeline pads the negative prompt to the prompt's T5 length, or cuts it).
- `duration_buckets`: requests are generated at the smallest bucket that holds them and trimmed back,
  so a few latent shapes serve every duration, and requests of different durations in one bucket share
  a batch (`batch_key`).
- `compile`: torch.compile of the UNet, warmed on every bucket and
  batch size up to `warmup_batch_sizes` in `warmup()`, before the service says SERVING. It implies
  per-caption encoding with the T5 states padded to a fixed length, so text length never changes a shape.
The GPT-2 loop itself already reuses its KV cache with transformers 5.17 / diffusers 0.42.1 (one token
per step after the first; tests/integration/test_audio_fast_path.py checks it stays so).
"""
from __future__ import annotations

import gc
import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from audio_service.config import COMPILE_MODES, check_buckets
from audio_service.backend import (
    AudioBackend,
    AudioRequest,
    AudioResult,
    BackendCancelled,
    NonFiniteAudio,
    StepCallback,
    StopCheck,
    Window,
    WindowShape,
    check_batch,
    num_samples,
)
from i2s_formats.contract import DEFAULT_GUIDANCE_SCALE
from serving import metrics, tracing
from serving.blocking import ModelWorker
from serving.deadline import Deadline
from serving.errors import NotReady
from serving.models import checkpoint_revision, hf_token, torch_dtype

__all__ = ["DiffusersAudioBackend", "Candidates", "COMPILE_MODES", "bucket_for", "candidate_seed", "fit_length",
           "resample"]

log = logging.getLogger(__name__)

# torch.compile modes; "aot_eager" traces with dynamo but runs eagerly (CPU tests of the compiled path).
WARMUP_STEPS = 3  # CUDA graph trees run a shape eagerly, then record it, then replay: three calls



@dataclass(frozen=True, eq=False)
class Candidates:
    """All candidates generated for one request, in generation order."""

    waveforms: np.ndarray  # (num_candidates, num_samples) float32
    scores: np.ndarray  # (num_candidates,) CLAP cosine similarity of each candidate to the request's prompt
    steps_run: int
    latents: np.ndarray | None = None  # (num_candidates, C, frames, bins) final latents of a window; else None


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


def bucket_for(duration_seconds: float, buckets: Sequence[float]) -> float:
    """The smallest bucket that holds the duration; the duration itself when none does (or no buckets)."""
    for bucket in buckets:
        if duration_seconds <= bucket + 1e-9:
            return float(bucket)
    return float(duration_seconds)


@dataclass(frozen=True, eq=False)
class _Encoding:
    """One caption's conditioning, as `encode_prompt` gives it for a batch of one."""

    t5: Any  # (1, L, D) T5 hidden states
    mask: Any  # (1, L) attention mask of the T5 states
    generated: Any  # (1, 8, D_gpt2) GPT-2 generated states


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
        compile: str = "none",
        duration_buckets: Sequence[float] = (),
        prompt_cache_size: int = 0,
        warmup_batch_sizes: Sequence[int] = (1,),
        warmup_duration_seconds: float = 1.0,
        self_check: bool = False,
        window_frames: int | None = None,
    ):
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile={compile!r} is not one of {', '.join(COMPILE_MODES)}")
        if prompt_cache_size < 0:
            raise ValueError("prompt_cache_size must not be negative")
        if not warmup_batch_sizes or min(warmup_batch_sizes) < 1:
            raise ValueError("warmup_batch_sizes must be positive")
        self.compile_mode = compile
        self.window_frames = window_frames  # long clips' window in latent frames; None: the model's native one
        check_buckets(duration_buckets)
        self.duration_buckets = tuple(sorted({float(b) for b in duration_buckets}))
        self.prompt_cache_size = int(prompt_cache_size)
        self.warmup_batch_sizes = tuple(sorted(set(int(b) for b in warmup_batch_sizes)))
        self.warmup_duration_seconds = float(warmup_duration_seconds)
        self.self_check = self_check  # compiled UNet against eager at warm-up also off CUDA (always on CUDA)
        self.serving_path = "eager" if compile == "none" else "compiled"
        self.serving_path_reason: str | None = None
        # Compiled shapes must not depend on caption length: the per-caption path pads T5 to a fixed length.
        self._own_encoding = self.prompt_cache_size > 0 or compile != "none"
        self._encodings: OrderedDict[str, _Encoding] = OrderedDict()
        self.encode_calls = 0  # captions encoded (cache misses), for tests and logs
        self.warmed_shapes: list[tuple[float, int]] = []  # (bucket seconds, batch size) warmed by warmup()
        self.worker = ModelWorker("audio-model")
        self.model_id = str(model)
        self._device_arg = device
        self._dtype_arg = dtype
        self.revision = revision
        self._token = hf_token(token)
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
            raise NotReady("the audio model is not loaded")
        return self._pipe

    def result_identity(self) -> dict | None:
        identity = super().result_identity()
        if identity is None:
            return None
        # Precision, device kind and buckets (a bucketed clip is rendered longer, then cut) change the samples.
        return {**identity, "dtype": str(self.dtype), "device": str(self.device).split(":")[0],
                "buckets": list(self.duration_buckets)}

    def batch_key(self, request: AudioRequest) -> tuple:
        """Like `request.batch_key()`, with the duration replaced by its bucket: one bucket, one batch."""
        key = request.batch_key()
        return (round(bucket_for(request.duration_seconds, self.duration_buckets), 6),) + key[1:]

    def load(self) -> None:
        self.worker.run(self._load)

    def _load(self) -> None:
        if self._pipe is not None:
            return
        started = time.perf_counter()
        import torch
        from diffusers import AudioLDM2Pipeline, DDIMScheduler, DPMSolverMultistepScheduler
        from transformers import GPT2LMHeadModel

        device = self._device_arg or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch_dtype(self._dtype_arg, device, gpu_default="float16")
        dtype_name = str(dtype).removeprefix("torch.")
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
        if self.compile_mode != "none":
            kwargs = compile_options(self.compile_mode)
            # dynamic=None (automatic): the first shape compiles static, the second batch size recompiles
            # once with the batch dimension symbolic, and later sizes reuse it (CUDA graphs still record
            # one graph per size, in warm-up). dynamic=True (all dims symbolic from the start) traced
            # 5x slower on CPU (329 s against 64 s for the tiny UNet, aot_eager).
            # In place (nn.Module.compile): the pipeline keeps its modules and their types. The UNet only,
            # where the time goes (20-200 calls per clip). The VAE decoder fails under dynamo on a
            # non-contiguous input (torch 2.11, CPU aot_eager); tracing the vocoder took minutes on CPU.
            pipe.unet.compile(**kwargs)
        self._encodings.clear()
        self.model_revision = checkpoint_revision(self.model_id, self.revision, self._token)
        self._pipe = pipe
        log.info("loaded %s in %.1f s", self.model_id, time.perf_counter() - started)

    def warmup(self) -> None:
        self.worker.run(self._warmup)

    def _warmup(self) -> None:
        """Runs every shape requests will use before the service says SERVING: each duration bucket (or
        the warm-up duration without buckets) at each warm-up batch size, guided and (compiled) unguided,
        plus one 2-candidate request so CLAP scoring is warm too. With `compile` set this is where compiling
        happens, then the compiled UNet is checked against the eager one (on CUDA always, elsewhere with
        `self_check`); a compile that fails or a check that does not pass leaves the eager UNet serving."""
        started = time.perf_counter()
        compiled = self.compile_mode != "none"
        try:
            self._warm_shapes()
            problem = self._self_check() if compiled and (self.self_check or self.device.startswith("cuda")) else None
        except Exception as exc:  # noqa: BLE001 - Inductor, a CUDA graph: the eager UNet is always correct
            if not compiled:
                raise
            problem = f"{type(exc).__name__}: {exc}"
        if problem is not None:
            self.serving_path_reason = f"the compiled UNet ({self.compile_mode}) failed at warm-up: {problem}"
            log.error("%s; serving the eager UNet", self.serving_path_reason)
            self.pipeline.unet._compiled_call_impl = None  # undoes nn.Module.compile (no public way)
            self.serving_path = "eager"
            self._warm_shapes()
        log.info("warm-up (compile=%s) of %d shapes in %.1f s", self.compile_mode if self.serving_path != "eager"
                 else "none", len(self.warmed_shapes), time.perf_counter() - started)

    def _warm_shapes(self) -> None:
        durations = self.duration_buckets or (self.warmup_duration_seconds,)
        compiled = self.serving_path == "compiled"
        # Eager kernels only need their first call (lazy initialisation); every step is the same UNet call.
        steps = WARMUP_STEPS if compiled else 1
        # Guidance <= 1 runs the UNet on half the batch: a shape of its own, warmed too when compiled.
        guidance = (DEFAULT_GUIDANCE_SCALE, 1.0) if compiled else (DEFAULT_GUIDANCE_SCALE,)
        self.warmed_shapes = []
        for duration in durations:
            for size in self.warmup_batch_sizes:
                for scale in guidance:
                    self._generate_candidates([
                        AudioRequest(prompt=f"warm up {i}", duration_seconds=duration, num_inference_steps=steps,
                                     seed=i, negative_prompt="warm up negative" if i % 2 else "",
                                     guidance_scale=scale)
                        for i in range(size)
                    ])
                self.warmed_shapes.append((duration, size))
        self._generate_candidates([AudioRequest(prompt="warm up", duration_seconds=durations[0],
                                                num_inference_steps=min(steps, 2), seed=0, num_candidates=2)])

    def _self_check(self) -> str | None:
        """One denoising step's UNet call, recorded from a real generation, run compiled and eager on the
        same latents and conditioning: None when they agree within :func:`serving.fast_path.tolerance`."""
        import torch

        from serving.fast_path import compare, tolerance

        unet = self.pipeline.unet
        compiled, calls = unet._compiled_call_impl, []

        def recording(*args, **kwargs):
            if not calls:
                calls.append((_cloned(args), _cloned(kwargs)))
            return compiled(*args, **kwargs)

        unet._compiled_call_impl = recording
        try:
            durations = self.duration_buckets or (self.warmup_duration_seconds,)
            self._generate_candidates([AudioRequest(prompt="self check", duration_seconds=durations[0],
                                                    num_inference_steps=1, seed=0)])
        finally:
            unet._compiled_call_impl = compiled
        args, kwargs = calls[0]
        with torch.no_grad():
            fast = compiled(*_cloned(args), **_cloned(kwargs))[0].float().clone()
            eager = unet._call_impl(*_cloned(args), **_cloned(kwargs))[0].float()
        problem = compare(fast, eager, tolerance(self.dtype))
        if problem is not None:
            log.error("self-check of the compiled UNet: %s; compiled mean %.4g std %.4g, eager mean %.4g std %.4g",
                      problem, float(fast.mean()), float(fast.std()), float(eager.mean()), float(eager.std()))
        return problem

    def close(self) -> None:
        self.worker.run(self._close)

    def _close(self) -> None:
        with self._lock:
            pipe, self._pipe = self._pipe, None
            self._schedulers = {}
            self._encodings.clear()
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
        deadline: Deadline | None = None,  # its callers leave at their deadlines, which turns should_stop true
        windows: Sequence[Window | None] | None = None,
    ) -> list[AudioResult | NonFiniteAudio]:
        return self.worker.run(lambda: self._generate(requests, should_stop, on_step, windows))

    def window_shape(self) -> WindowShape:
        """The model's native window (unet sample_size latent frames: 10.24 s for cvssp/audioldm2), or
        `window_frames` (tests and benchmarks: the tiny checkpoint's native 2.56 s is arbitrary)."""
        pipe = self.pipeline
        hop = int(np.prod(pipe.vocoder.config.upsample_rates))
        frames = self.window_frames or int(pipe.unet.config.sample_size)
        return WindowShape(frames=frames, frame_samples=hop * pipe.vae_scale_factor,
                           sample_rate_hertz=self.sample_rate_hertz)

    def _generate(self, requests: Sequence[AudioRequest], should_stop: StopCheck | None,
                  on_step: StepCallback | None, windows: Sequence[Window | None] | None = None,
                  ) -> list[AudioResult | NonFiniteAudio]:
        requests = list(requests)
        candidates = self._generate_candidates(requests, should_stop=should_stop, on_step=on_step, windows=windows)
        results = []
        for request, cands in zip(requests, candidates):
            best = int(np.argmax(cands.scores))
            if not np.isfinite(cands.scores[best]):
                metrics.NONFINITE_AUDIO.inc()
                results.append(NonFiniteAudio(
                    f"the audio model produced NaN or infinite samples for this clip ({self.dtype}); the clip "
                    f"failed instead of going out as silence"))
                continue
            results.append(
                AudioResult(
                    waveform=cands.waveforms[best].copy(),
                    sample_rate_hertz=self.sample_rate_hertz,
                    score=float(cands.scores[best]),
                    steps_run=cands.steps_run,
                    scheduler=request.scheduler,
                    model_id=self.model_id,
                    candidate_index=best,
                    latent=None if cands.latents is None else cands.latents[best],
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
        """Like `generate`, but returns every candidate of every request with its CLAP score (`score_candidates`)."""
        return self.worker.run(lambda: self._generate_candidates(requests, should_stop=should_stop, on_step=on_step))

    def generation_samples(self, request: AudioRequest) -> int:
        """How many samples are generated for the request: its own length, or with buckets its bucket's,
        rounded up to whole UNet blocks (latent length a multiple of the UNet's 2**upsamplers, so no
        resize path and no graph break in the compiled UNet); the clip is trimmed back after."""
        if not self.duration_buckets:
            return num_samples(request.duration_seconds, self.sample_rate_hertz)
        pipe = self.pipeline
        n = num_samples(bucket_for(request.duration_seconds, self.duration_buckets), self.sample_rate_hertz)
        align = (int(np.prod(pipe.vocoder.config.upsample_rates)) * pipe.vae_scale_factor
                 * 2 ** int(getattr(pipe.unet, "num_upsamplers", 0)))
        return -(-n // align) * align

    def _generate_candidates(
        self,
        requests: Sequence[AudioRequest],
        *,
        should_stop: StopCheck | None = None,
        on_step: StepCallback | None = None,
        windows: Sequence[Window | None] | None = None,
    ) -> list[Candidates]:
        requests = list(requests)
        check_batch(requests, key=self.batch_key)
        if windows is not None and (len(windows) != len(requests) or any(w is None for w in windows)):
            raise ValueError("windows: one per request, all set")
        import torch

        first = requests[0]
        total, k = first.num_inference_steps, first.num_candidates
        with self._lock:
            pipe = self.pipeline
            if should_stop is not None and should_stop():
                raise BackendCancelled(0, total)

            # Generated at the bucket's length, each request trimmed back to its own below; a window at
            # exactly the model's window (long_clips asks for that length).
            n = self.generation_samples(first) if windows is None else num_samples(first.duration_seconds,
                                                                                    self.sample_rate_hertz)
            hop = int(np.prod(pipe.vocoder.config.upsample_rates))
            frames = math.ceil(n / hop)
            # Half a frame of slack: the pipeline floors audio_length_in_s / hop-seconds to whole frames.
            audio_length_in_s = (frames + 0.5) * hop / self.sample_rate_hertz

            generators = [
                torch.Generator("cpu").manual_seed(candidate_seed(r.seed, i)) for r in requests for i in range(k)
            ]
            negatives = [r.negative_prompt.strip() for r in requests]
            steps_run = 0
            hold = None
            if windows is not None:
                from audio_service.latent_windows import OverlapHold

                hold = OverlapHold(pipe, self._schedulers[first.scheduler], windows, k, generators,
                                   n // (hop * pipe.vae_scale_factor), total, self.device, self.dtype)

            def step_callback(step_index: int, timestep: Any, latents: Any) -> None:
                nonlocal steps_run
                steps_run = step_index + 1
                if hold is not None:
                    hold.apply(step_index, latents)
                if on_step is not None:
                    on_step(steps_run, total)
                if steps_run == total:  # the pipeline goes on to the VAE decoder and the vocoder
                    phases.enter("audio.vae_vocoder")
                if should_stop is not None and should_stop():
                    raise _Stop(steps_run)

            pipe.scheduler = self._schedulers[first.scheduler]
            prompts = [r.prompt.strip() for r in requests]
            phases = tracing.batch_phases()  # the callers' trace spans (no-op when tracing is off)
            phases.enter("audio.prompt_encoding")
            if self._own_encoding:
                conditioning = self._conditioning(prompts, negatives, guided=first.guidance_scale > 1.0)
            else:
                conditioning = dict(prompt=prompts, negative_prompt=negatives if any(negatives) else None)
            phases.enter("audio.denoise")
            try:
                output = pipe(
                    **conditioning,
                    audio_length_in_s=audio_length_in_s,
                    num_inference_steps=total,
                    guidance_scale=float(first.guidance_scale),
                    num_waveforms_per_prompt=k,
                    generator=generators,
                    latents=None if hold is None else hold.initial,
                    callback=step_callback,
                    callback_steps=1,
                    output_type="np",
                )
            except _Stop as stop:
                raise BackendCancelled(stop.steps_run, total) from None
            phases.end()

            audio = fit_length(np.asarray(output.audios), n).reshape(len(requests), k, n)
            finite = np.isfinite(audio).all(axis=-1)  # (B, K): a candidate with any NaN or inf is no clip
            if not finite.all():
                log.error("%d of %d generated clips have NaN or infinite samples (dtype %s); they fail",
                          int((~finite).sum()), finite.size, self.dtype)
                audio = np.where(finite[..., None], audio, 0.0).astype(np.float32)  # scored below, never sent
            clips = [np.ascontiguousarray(audio[b, :, : num_samples(r.duration_seconds, self.sample_rate_hertz)])
                     for b, r in enumerate(requests)]
            # Every clip is scored (its quality number), not only when there are candidates to rank.
            phases.enter("audio.clap_score")
            if len({c.shape[-1] for c in clips}) == 1:  # one CLAP forward for the batch
                scores = list(self._score_candidates(prompts, np.stack(clips)))
            else:
                scores = [self._score_candidates([p], c[None])[0] for p, c in zip(prompts, clips)]
            phases.end()
        # A non-finite candidate ranks last (-inf) and never wins: _generate fails a request with no other.
        latents = None if hold is None else hold.final.reshape(len(requests), k, *hold.final.shape[1:])
        return [
            Candidates(waveforms=clips[b], scores=np.where(finite[b], scores[b], -np.inf).astype(np.float32),
                       steps_run=steps_run or total,
                       latents=None if latents is None else latents[b])
            for b in range(len(requests))
        ]

    # -- per-caption encoding (the fast path) ------------------------------------------------------

    def _encode(self, caption: str) -> _Encoding:
        """The caption's conditioning, from the LRU or computed alone (a batch of one: no padding)."""
        import torch

        cached = self._encodings.get(caption)
        if cached is not None:
            self._encodings.move_to_end(caption)
            return cached
        pipe = self.pipeline
        with torch.no_grad():
            t5, mask, generated = pipe.encode_prompt([caption], pipe._execution_device, 1, False)
        encoding = _Encoding(t5=t5, mask=mask, generated=generated)
        self.encode_calls += 1
        if self.prompt_cache_size > 0:
            self._encodings[caption] = encoding
            while len(self._encodings) > self.prompt_cache_size:
                self._encodings.popitem(last=False)
        return encoding

    def _conditioning(self, prompts: list[str], negatives: list[str], *, guided: bool) -> dict[str, Any]:
        """Pipeline kwargs built from per-caption encodings: T5 states right-padded (mask 0) to one length,
        fixed (the tokenizer's maximum) under compile so the UNet sees one text shape."""
        import torch

        positive = [self._encode(p) for p in prompts]
        negative = [self._encode(n) for n in negatives] if guided else []
        if self.compile_mode != "none":
            length = int(self.pipeline.tokenizer_2.model_max_length)
        else:
            length = max(e.t5.shape[1] for e in positive + negative)

        def stack(encodings: list[_Encoding]) -> tuple[Any, Any, Any]:
            t5, masks = [], []
            for e in encodings:
                pad = length - e.t5.shape[1]
                t5.append(torch.nn.functional.pad(e.t5, (0, 0, 0, pad)))
                masks.append(torch.nn.functional.pad(e.mask, (0, pad)))
            return torch.cat(t5), torch.cat(masks), torch.cat([e.generated for e in encodings])

        kwargs: dict[str, Any] = {}
        kwargs["prompt_embeds"], kwargs["attention_mask"], kwargs["generated_prompt_embeds"] = stack(positive)
        if guided:
            (kwargs["negative_prompt_embeds"], kwargs["negative_attention_mask"],
             kwargs["negative_generated_prompt_embeds"]) = stack(negative)
        return kwargs

    def score_candidates(self, prompts: Sequence[str], waveforms: np.ndarray) -> np.ndarray:
        """The clip score and the candidate ranking, one function: see `_score_candidates`."""
        return self.worker.run(self._score_candidates, prompts, waveforms)

    def _score_candidates(self, prompts: Sequence[str], waveforms: np.ndarray) -> np.ndarray:
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


def compile_options(mode: str) -> dict[str, Any]:
    """torch.compile's arguments for a compile mode ("aot_eager": dynamo tracing, eager kernels)."""
    return {"backend": "aot_eager"} if mode == "aot_eager" else {"mode": mode}


def _cloned(value: Any) -> Any:
    """Tensors in (nested) args copied: a captured call's inputs may be overwritten by the next step."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_cloned(v) for v in value)
    if isinstance(value, dict):
        return {k: _cloned(v) for k, v in value.items()}
    return value


def _keep_generation_order(text: Any, audio: Any, num_waveforms_per_prompt: int, device: Any, dtype: Any) -> Any:
    return audio
