"""The VLM decode engine against the reference generate() path, on the tiny real Qwen2.5-VL (CPU, greedy).

The engine must give exactly generate()'s tokens (batch 1, and rows of different lengths sharing a batch,
with and without exact jump-forward), keep the others unchanged when one request is cancelled mid-batch,
run every model call on one thread, and produce schema-valid descriptions in every mode.
"""
from __future__ import annotations

import threading
import time

import jsonschema
import numpy as np
import pytest
import torch
from PIL import Image

from serving.errors import Overloaded
from tests.vlm_fixtures import description_schema
from i2s_formats.source_merge import merge_sources
from vlm_service import rules
from vlm_service.backend import DecodingOptions, DescriptionDone, SceneHeader, SourceFound
from vlm_service.engine_options import EngineOptions
from vlm_service.messages import Failed, Finished, Tokens
from vlm_service.transformers_backend import TransformersVisionBackend, render_chatml
from vlm_prompt import load_prompt

FULL = 1024  # room for the tiny model to finish its JSON (~400-700 tokens)


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


# Different sizes: different numbers of visual tokens, so the rows have different prompt lengths.
IMAGES = [_image(0, (64, 48)), _image(1, (96, 64)), _image(2, (40, 120))]


def _options(**changes) -> EngineOptions:
    base = dict(max_batch=4, batch_buckets=(1, 2, 4), token_buckets=(1, 4), length_buckets=(1024, 2048),
                jump_forward="off", prefix_cache=False)
    base.update(changes)
    return EngineOptions(**base)


def _backend(tiny_vlm_dir, engine: EngineOptions | None, **kwargs) -> TransformersVisionBackend:
    b = TransformersVisionBackend(str(tiny_vlm_dir), device="cpu", engine=engine, **kwargs)
    b.load()
    b.warmup()
    return b


class _Collect:
    """What the model thread delivers for one request: token ids and how it ended."""

    def __init__(self, cancel_after: int | None = None) -> None:
        self.tokens: list[int] = []
        self.end: Finished | Failed | None = None
        self.done = threading.Event()
        self.cancel_after = cancel_after
        self.req = None
        self.threads: set[int] = set()

    def __call__(self, item) -> None:
        self.threads.add(threading.get_ident())
        if isinstance(item, Tokens):
            self.tokens.extend(item.ids)
            if self.cancel_after is not None and len(self.tokens) >= self.cancel_after:
                self.req.cancelled.set()
        else:
            self.end = item
            self.done.set()


def _submit(backend, image, max_new_tokens=FULL, collect: _Collect | None = None, **kwargs) -> _Collect:
    collect = collect or _Collect(kwargs.pop("cancel_after", None))
    collect.req, _ = backend.submit(image, DecodingOptions(max_new_tokens=max_new_tokens), collect, **kwargs)
    return collect


def _wait(*collects: _Collect) -> None:
    for c in collects:
        assert c.done.wait(300), "request did not end"


@pytest.fixture(scope="module")
def reference(tiny_vlm_dir):
    b = _backend(tiny_vlm_dir, None)
    yield b
    b.close()


# (image, max_new_tokens) pairs the tests compare; generate() is slow on CPU, so only image 0 runs to the end.
CASES = [(0, FULL), (0, 40), (1, 200), (2, 120)]


@pytest.fixture(scope="module")
def reference_tokens(reference):
    """generate()'s tokens for each case."""
    out = {}
    for i, n in CASES:
        c = _submit(reference, IMAGES[i], n)
        _wait(c)
        out[i, n] = c.tokens
    assert out[0, FULL][-1] in reference._stop_ids  # the complete JSON, then a stop token
    return out


@pytest.fixture(scope="module", params=["off", "exact"])
def engine(request, tiny_vlm_dir):
    b = _backend(tiny_vlm_dir, _options(jump_forward=request.param))
    yield b
    b.close()


def test_engine_gives_generates_tokens_at_batch_1(engine, reference_tokens):
    c = _submit(engine, IMAGES[0])
    _wait(c)
    assert c.end.reason == "stop"
    assert c.tokens == reference_tokens[0, FULL]
    steps = c.end.steps
    if engine.engine_options.jump_forward == "exact":
        assert steps < len(c.tokens)  # forced tokens rode along in other steps
    else:
        assert steps == len(c.tokens)


def test_rows_of_different_lengths_share_a_batch_and_keep_their_tokens(engine, reference_tokens):
    engine.engine.peak_rows = 0
    joined = threading.Event()
    late: list[_Collect] = []

    class JoinWhenRunning(_Collect):
        def __call__(self, item) -> None:
            super().__call__(item)
            if isinstance(item, Tokens) and len(self.tokens) >= 30 and not joined.is_set():
                joined.set()  # submitted from the model thread mid-decode: admitted at the next step
                late.append(_submit(engine, IMAGES[0]))

    # A short one (frees its row early) and two longer ones; a fourth joins while they decode.
    first = [_submit(engine, IMAGES[0], 40), _submit(engine, IMAGES[1], 200, collect=JoinWhenRunning()),
             _submit(engine, IMAGES[2], 120)]
    _wait(*first)
    assert joined.is_set()
    _wait(*late)
    assert engine.engine.peak_rows >= 3
    assert first[0].tokens == reference_tokens[0, 40] and first[0].end.reason == "length"
    assert first[1].tokens == reference_tokens[1, 200]
    assert first[2].tokens == reference_tokens[2, 120]
    assert late[0].tokens == reference_tokens[0, FULL] and late[0].end.reason == "stop"


def test_a_request_cancelled_mid_batch_stops_and_the_others_complete_unchanged(engine, reference_tokens):
    keep = [_submit(engine, IMAGES[1], 200), _submit(engine, IMAGES[2], 120)]
    dropped = _submit(engine, IMAGES[0], cancel_after=25)
    _wait(dropped, *keep)
    assert dropped.end.reason == "cancelled"
    assert 25 <= len(dropped.tokens) < len(reference_tokens[0, FULL])
    assert dropped.tokens == reference_tokens[0, FULL][: len(dropped.tokens)]
    assert keep[0].tokens == reference_tokens[1, 200]
    assert keep[1].tokens == reference_tokens[2, 120]


def test_a_deadline_that_passed_ends_the_request_without_decoding(engine):
    c = _submit(engine, IMAGES[0], deadline=time.monotonic() - 1)
    _wait(c)
    assert c.end == Finished("deadline", 0) and c.tokens == []


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("jump", ["exact", "retokenize"])
def test_every_output_is_schema_valid(tiny_vlm_dir, version, jump):
    b = _backend(tiny_vlm_dir, _options(jump_forward=jump, prefix_cache=True), prompt_version=version)
    try:
        assert b.prompt_text == render_chatml(load_prompt(version))  # the checkpoint's template, same layout
        cached = b.tokenizer.decode(b.engine.prefix_ids)  # the prompt text before the image, computed once
        assert cached.startswith("<|im_start|>system") and cached.endswith("<|vision_start|>")
        assert ("sources first" in cached) is (version == "v2")  # v2 puts the task text before the image
        streams = [b.stream(image, DecodingOptions(max_new_tokens=FULL)) for image in IMAGES[:2]]  # decoded together
        for events in streams:
            events = list(events)
            done = events[-1]
            assert isinstance(done, DescriptionDone) and done.finish_reason == "stop"
            assert done.description.prompt_version == version
            jsonschema.validate(rules.to_compact_dict(done.description), description_schema())
            assert isinstance(events[0], SceneHeader)
            found = [e.source for e in events if isinstance(e, SourceFound)]
            assert merge_sources(found) == list(done.description.sources)
            assert done.model_steps < done.output_tokens
            if version == "v2":  # sources first: the header went out before the scene was decoded
                assert (events[0].scene, events[0].mood) == ("", "")
                assert done.description.scene and done.description.mood
    finally:
        b.close()


def test_prefix_cache_prefill_matches_the_full_prefill(tiny_vlm_dir):
    """The system turn's KV computed once and reused gives the same first-token logits as a full prefill."""
    from vlm_service.engine import EngineRequest, Row

    logits = {}
    for cached in (False, True):
        b = _backend(tiny_vlm_dir, _options(prefix_cache=cached))
        try:
            engine = b.engine
            assert bool(engine._prefix_kv) is cached
            req = EngineRequest(inputs=b.prepare_inputs(IMAGES[1]), max_new_tokens=8, temperature=0, top_p=1,
                                seed=None, deliver=lambda item: None)
            logits[cached] = b._on_model_thread(lambda: engine._prefill(Row(req, 0)).clone())
        finally:
            b.close()
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-4, atol=1e-4)


def test_the_compiled_step_gives_the_same_tokens(tiny_vlm_dir, reference_tokens):
    """capture="compile" traces the decode step with torch.compile (CPU: the "eager" backend checks the
    traced path; on CUDA it is reduce-overhead) and changes no token."""
    b = _backend(tiny_vlm_dir, _options(capture="compile", compile_backend="eager", token_buckets=(1,),
                                        batch_buckets=(1, 2, 4), length_buckets=(1024,)))
    try:
        c = _submit(b, IMAGES[0], 40)
        _wait(c)
        assert c.tokens == reference_tokens[0, 40]
    finally:
        b.close()


def _forward_threads(model) -> tuple[set[int], object]:
    """The threads the model's forward runs on, from now on (and the hook, to remove)."""
    threads: set[int] = set()
    hook = model.register_forward_pre_hook(lambda *_: threads.add(threading.get_ident()))
    return threads, hook


def test_all_model_work_runs_on_one_thread_across_requests_cancellations_and_errors(tiny_vlm_dir, reference):
    probe = reference.prepare_inputs(IMAGES[0])["input_ids"].shape[1]
    b = _backend(tiny_vlm_dir, _options(length_buckets=(probe + 64,), token_buckets=(1,)))
    model_thread = b.worker.submit(threading.get_ident).result()  # the worker's one thread
    forwards, hook = _forward_threads(b.model)
    try:
        ok = _submit(b, IMAGES[0], 20)
        cancelled = _submit(b, IMAGES[0], 60, cancel_after=5)
        too_long = _submit(b, _image(3, (640, 480)), 20)  # more visual tokens than a row holds: fails on the thread
        _wait(ok, cancelled, too_long)
        again = _submit(b, IMAGES[0], 20)
        _wait(again)
        assert ok.end.reason == "length" and cancelled.end.reason == "cancelled"
        assert isinstance(too_long.end, Failed) and "does not fit" in str(too_long.end.error)
        assert again.tokens == ok.tokens
        threads = set(forwards)
        for c in (ok, cancelled, too_long, again):
            threads |= c.threads
        assert threads == {model_thread}
        assert model_thread != threading.get_ident()
    finally:
        hook.remove()
        b.close()
    # The reference path too: every generate() on its one model thread.
    forwards, hook = _forward_threads(reference.model)
    try:
        _wait(_submit(reference, IMAGES[0], 4))
    finally:
        hook.remove()
    assert forwards == {reference.worker.submit(threading.get_ident).result()}


def test_a_full_queue_refuses_with_overloaded(tiny_vlm_dir):
    b = _backend(tiny_vlm_dir, _options(), max_queue=1)
    release = threading.Event()
    try:
        busy = b.worker.submit(release.wait)  # hold the model thread: submitted requests wait
        waiting = _submit(b, IMAGES[0], 4)
        with pytest.raises(Overloaded):
            _submit(b, IMAGES[0], 4)
        release.set()
        busy.result()
        _wait(waiting)
        assert waiting.end.reason in ("length", "stop")
    finally:
        release.set()
        b.close()


def test_the_attention_paths_give_the_same_tokens(tiny_vlm_dir, reference_tokens):
    """The engine's grouped-query attention (K/V heads read once, the default) is what the layers call; the
    FlexAttention path over each row's own length (eager flex_attention on CPU: the reference of its fused
    kernel) and the model's own attention (K/V repeated per query head) give the same tokens: generate()'s."""
    from vlm_service.attention import FLEX_NAME, NAME

    for attention in ("gqa", "flex", "model"):
        b = _backend(tiny_vlm_dir, _options(attention=attention, batch_buckets=(1, 2), max_batch=2))
        try:
            config = b.model.model.language_model.config
            assert config._attn_implementation == {"gqa": NAME, "flex": FLEX_NAME}.get(attention, "sdpa")
            assert b.model.config.vision_config._attn_implementation != NAME
            both = [_submit(b, IMAGES[0], 40), _submit(b, IMAGES[2], 120)]
            _wait(*both)
            assert both[0].tokens == reference_tokens[0, 40]
            assert both[1].tokens == reference_tokens[2, 120]
        finally:
            b.close()


def test_chunked_prefill_keeps_the_others_decoding_and_changes_no_token(tiny_vlm_dir, reference_tokens):
    """A request that joins while others decode is prefilled 16 tokens per step between their decode steps:
    the others get tokens while it prefills, and every request still gets generate()'s tokens."""
    b = _backend(tiny_vlm_dir, _options(prefill_chunk=16, jump_forward="exact"))
    try:
        prompt_tokens = b.prepare_inputs(IMAGES[0])["input_ids"].shape[1]
        assert prompt_tokens > 3 * 16  # several chunks
        joined = threading.Event()
        late: list[_Collect] = []
        marks: dict[str, int] = {}

        class Late(_Collect):
            def __call__(self, item) -> None:
                if isinstance(item, Tokens) and not self.tokens:
                    marks["first_token"] = len(running.tokens)
                super().__call__(item)

        class JoinWhenRunning(_Collect):
            def __call__(self, item) -> None:
                super().__call__(item)
                if isinstance(item, Tokens) and len(self.tokens) >= 20 and not joined.is_set():
                    joined.set()
                    marks["submitted"] = len(self.tokens)
                    late.append(_submit(b, IMAGES[0], collect=Late()))

        running = _submit(b, IMAGES[1], 200, collect=JoinWhenRunning())
        _wait(running)
        _wait(*late)
        assert running.tokens == reference_tokens[1, 200]
        assert late[0].tokens == reference_tokens[0, FULL] and late[0].end.reason == "stop"
        assert marks["first_token"] - marks["submitted"] >= 3  # it kept decoding during the chunks
    finally:
        b.close()


def test_capture_that_fails_at_warm_up_falls_back_to_eager_before_serving(tiny_vlm_dir, reference_tokens, caplog):
    """capture="auto" means CUDA graphs on CUDA only; a capture that fails at warm-up is logged, the step
    runs eager, the backend is ready only after that decision, and the tokens are generate()'s."""
    from vlm_service.model_runner import resolve_capture

    assert resolve_capture("auto", "cuda") == "cuda-graph"
    assert resolve_capture("auto", "cpu") == "none"
    assert resolve_capture("compile", "cpu") == "compile"
    b = TransformersVisionBackend(str(tiny_vlm_dir), device="cpu",
                                  engine=_options(capture="compile", compile_backend="no-such-backend"))
    try:
        b.load()
        assert not b.ready and b.engine.runner.capture == "compile"
        with caplog.at_level("WARNING", logger="vlm_service.model_runner"):
            b.warmup()
        assert b.ready
        runner = b.engine.runner
        assert runner.capture == "none" and "no-such-backend" in runner.capture_error
        assert any("running eager" in r.getMessage() for r in caplog.records)
        c = _submit(b, IMAGES[0], 40)
        _wait(c)
        assert c.tokens == reference_tokens[0, 40]
    finally:
        b.close()


def test_a_seed_gives_the_same_sampled_tokens_alone_and_in_a_batch(engine):
    """Sampled rows draw on the device from their own seeded generator: batch-mates change nothing."""
    def sampled(image, seed) -> _Collect:
        c = _Collect()
        c.req, _ = engine.submit(image, DecodingOptions(max_new_tokens=60, temperature=0.8, top_p=0.95, seed=seed), c)
        return c

    alone = sampled(IMAGES[0], 7)
    _wait(alone)
    together = [sampled(IMAGES[0], 7), _submit(engine, IMAGES[1], 80), sampled(IMAGES[0], 8)]
    _wait(*together)
    assert alone.end.reason == "length" and len(alone.tokens) == 60
    assert together[0].tokens == alone.tokens
    assert together[2].tokens != alone.tokens
