"""The engine's fast path proves itself before SERVING, and the hazards around it stay closed (tiny real
Qwen2.5-VL on CPU): the self-check of the compiled step passes, a perturbed step is caught and the eager step
serves (log, health detail, metric) with unchanged tokens; the staging buffer is never written while its copy
is in flight (a step where no row chooses, then a prefill chunk); the grammar-mask kernel is chosen once;
the flex fallback registers the plain attention again."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image
from prometheus_client import REGISTRY

from serving import health
from vlm_service.attention import FLEX_NAME, NAME
from vlm_service.backend import DecodingOptions
from vlm_service.engine_options import EngineOptions
from vlm_service.messages import Finished, Tokens
from vlm_service.model_runner import StepInputs
from vlm_service.server import load_and_warm
from vlm_service.transformers_backend import TransformersVisionBackend


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


IMAGES = [_image(0, (64, 48)), _image(1, (96, 64))]


def _options(**changes) -> EngineOptions:
    base = dict(max_batch=2, batch_buckets=(1, 2), token_buckets=(1, 4), length_buckets=(1024, 2048),
                jump_forward="off", prefix_cache=False)
    base.update(changes)
    return EngineOptions(**base)


class _Collect:
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.end = None
        self.done = threading.Event()

    def __call__(self, item) -> None:
        if isinstance(item, Tokens):
            self.tokens.extend(item.ids)
        else:
            self.end = item
            self.done.set()


def _run(backend, image, n: int, collect: _Collect | None = None) -> _Collect:
    collect = collect or _Collect()
    backend.submit(image, DecodingOptions(max_new_tokens=n), collect)
    return collect


def _wait(*collects: _Collect) -> None:
    for c in collects:
        assert c.done.wait(600), "a request did not end"
        assert isinstance(c.end, Finished), c.end


def _metric(service: str, path: str) -> float | None:
    return REGISTRY.get_sample_value("i2s_fast_path", {"service": service, "path": path})


def test_the_self_check_passes_on_the_compiled_step(tiny_vlm_dir):
    b = TransformersVisionBackend(str(tiny_vlm_dir), device="cpu",
                                  engine=_options(capture="compile", compile_backend="eager", self_check=True))
    try:
        load_and_warm(b)
        assert b.serving_path == "compile" and b.serving_path_reason is None
        assert _metric("vlm", "compile") == 1.0 and _metric("vlm", "eager") is None
        assert health.DETAILS["vlm-path"] == "compile" and "vlm-path-reason" not in health.DETAILS
    finally:
        b.close()


def test_a_perturbed_step_fails_the_self_check_and_the_eager_step_serves_the_same_tokens(tiny_vlm_dir, caplog):
    plain = TransformersVisionBackend(str(tiny_vlm_dir), device="cpu", engine=_options())
    b = TransformersVisionBackend(str(tiny_vlm_dir), device="cpu",
                                  engine=_options(capture="compile", compile_backend="eager", self_check=True))
    try:
        load_and_warm(plain)
        expected = _run(plain, IMAGES[0], 40)
        _wait(expected)
        b.load()
        runner = b.engine.runner
        setup = runner._setup_compile

        def perturbed_setup() -> None:  # a wrong graph: the logits of another world
            setup()
            compiled = runner._compiled
            runner._compiled = lambda *args, **kwargs: -compiled(*args, **kwargs)

        runner._setup_compile = perturbed_setup
        with caplog.at_level("WARNING"):
            b.warmup()
            from serving import fast_path

            fast_path.report("vlm", b.serving_path, b.serving_path_reason)
        assert b.serving_path == "eager" and "self-check of the compile step failed" in b.serving_path_reason
        assert any("self-check of the compile step" in r.getMessage() and "eager argmax" in r.getMessage()
                   for r in caplog.records)  # both results logged
        assert any("vlm serves the eager path" in r.getMessage() for r in caplog.records)
        assert _metric("vlm", "eager") == 1.0 and _metric("vlm", "compile") is None
        assert health.DETAILS["vlm-path"] == "eager" and "max |delta|" in health.DETAILS["vlm-path-reason"]
        got = _run(b, IMAGES[0], 40)
        _wait(got)
        assert got.tokens == expected.tokens
    finally:
        plain.close()
        b.close()


class FakeInFlightStaging(StepInputs):
    """CPU staging whose copy counts as in flight from stage() until wait_staged(), as a pinned buffer's
    asynchronous copy on CUDA: the host views are read-only meanwhile, so a write before the wait raises."""

    def __init__(self, real: StepInputs, events: list) -> None:
        import torch

        super().__init__(real.max_batch, real.max_width, torch.device("cpu"))
        self.events = events

    def _host_views(self):
        return (self.host_tokens, self.host_history_at, self.host_base, self.host_delta, self.host_last)

    def stage(self) -> None:
        super().stage()
        self.events.append("stage")
        for view in self._host_views():
            view.flags.writeable = False

    def wait_staged(self) -> None:
        super().wait_staged()
        self.events.append("wait")
        for view in self._host_views():
            view.flags.writeable = True


def test_the_staging_buffer_is_not_written_while_its_copy_is_in_flight(tiny_vlm_dir):
    """Token buckets (1, 2) with exact jump-forward: a forced run of tokens makes steps where no row chooses
    (its feed is longer than a step takes), and a request joining meanwhile is prefilled in 16-token
    chunks. Every host write waits for the last copy, and both requests get their tokens alone."""
    b = TransformersVisionBackend(str(tiny_vlm_dir), device="cpu",
                                  engine=_options(token_buckets=(1, 2), jump_forward="exact", prefill_chunk=16))
    try:
        load_and_warm(b)
        alone = [_run(b, IMAGES[1], 120), _run(b, IMAGES[0], 60)]
        _wait(alone[0])
        _wait(alone[1])
        engine, events = b.engine, []
        engine.inputs = engine.runner.inputs = FakeInFlightStaging(engine.inputs, events)
        choose, prefill = engine._choose, engine.runner.prefill

        def recording_choose(logits, picks, *args, **kwargs):
            events.append(f"choose {len(picks)}")
            return choose(logits, picks, *args, **kwargs)

        def recording_prefill(*args, **kwargs):
            events.append("prefill")
            return prefill(*args, **kwargs)

        engine._choose, engine.runner.prefill = recording_choose, recording_prefill
        joined = threading.Event()
        late: list[_Collect] = []

        class JoinWhenRunning(_Collect):
            def __call__(self, item) -> None:
                super().__call__(item)
                if isinstance(item, Tokens) and len(self.tokens) >= 10 and not joined.is_set():
                    joined.set()
                    late.append(_run(b, IMAGES[0], 60))

        running = _run(b, IMAGES[1], 120, JoinWhenRunning())
        _wait(running)
        _wait(*late)
        assert running.tokens == alone[0].tokens and late[0].tokens == alone[1].tokens
        # The hazard's sequence happened: a step whose rows chose nothing (no sync), then a prefill chunk.
        text = " ".join(events)
        assert "stage choose 0 prefill" in text, text[:600]
    finally:
        b.close()


def test_the_mask_kernel_is_chosen_once_and_a_failing_one_leaves_the_plain_path(tiny_vlm_dir, monkeypatch):
    import xgrammar as xgr

    real = xgr.apply_token_bitmask_inplace
    calls = []

    def kernel(logits, bitmask, *, vocab_size=None, indices=None, backend="auto"):
        calls.append(backend)
        if backend == "auto":
            raise ValueError("no kernel for this device (a fake failure)")  # not one of the types caught before
        return real(logits, bitmask, vocab_size=vocab_size, indices=indices, backend=backend)

    monkeypatch.setattr(xgr, "apply_token_bitmask_inplace", kernel)
    b = TransformersVisionBackend(str(tiny_vlm_dir), device="cpu", engine=_options())
    try:
        load_and_warm(b)
        assert b.engine.structured.backend == "torch_native"
        failed = calls.count("auto")
        c = _Collect()
        b.submit(IMAGES[0], DecodingOptions(max_new_tokens=20, temperature=0.8, seed=3), c)
        _wait(c)
        assert len(c.tokens) == 20
        assert calls.count("auto") == failed  # never tried again per step
    finally:
        b.close()


def test_the_flex_fallback_registers_the_plain_attention_again(tiny_vlm_dir):
    b = TransformersVisionBackend(str(tiny_vlm_dir), device="cpu", engine=_options(attention="flex"))
    try:
        b.load()
        runner = b.engine.runner
        assert b.model.config.text_config._attn_implementation == FLEX_NAME and runner.block_masks
        runner.fall_back_to_eager()
        assert b.model.config.text_config._attn_implementation == NAME and not runner.block_masks
    finally:
        b.close()


def test_random_weights_build_the_model_on_its_device_from_a_checkpoint_without_weights(tiny_vlm_dir, tmp_path):
    """The bench's --random-weights: a skeleton (config, tokenizer, processor; no weight files) is enough, and
    the model answers; without the flag the same folder cannot load."""
    import shutil

    skeleton = tmp_path / "skeleton"
    shutil.copytree(tiny_vlm_dir, skeleton, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    b = TransformersVisionBackend(str(skeleton), device="cpu", random_weights=True, engine=_options())
    try:
        load_and_warm(b)
        assert all(p.device.type == "cpu" and p.isfinite().all() for p in b.model.parameters())
        c = _run(b, IMAGES[0], 12)
        _wait(c)
        assert len(c.tokens) == 12
    finally:
        b.close()
    with pytest.raises(OSError):
        TransformersVisionBackend(str(skeleton), device="cpu", engine=None).load()
