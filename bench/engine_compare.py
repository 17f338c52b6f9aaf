"""The decode engine against generate(), in this process, at one thread count (``python -m bench vlm``).

For each path: ms per output token for one request (decode only, from its first token to its end); for the
engine also the host milliseconds per step outside the forward at batch 1 and batch 8 (wall time of a step
minus the time inside the forward call: on CPU the forward runs synchronously, so this is the host work;
on CUDA the forward call only launches, so use the GPU ms per token instead), and the tensor ops and
device reads of one step (:mod:`bench.host_work`); for generate() the same per step, around its forward.
"""
from __future__ import annotations

import functools
import io
import statistics
import threading
import time
from typing import Any

from bench.host_work import HostWorkCounter, count_engine_steps


def _decode(backend: Any, image: Any, tokens: int, clients: int = 1) -> list[dict]:
    """``clients`` requests at once; per request: output tokens and decode ms per token."""
    from vlm_service.backend import DecodingOptions
    from vlm_service.messages import Tokens

    done = [threading.Event() for _ in range(clients)]
    marks: list[dict] = [{"n": 0, "first": None, "last": None} for _ in range(clients)]

    def deliver(i: int):
        def put(item) -> None:
            now = time.perf_counter()
            if isinstance(item, Tokens):
                if marks[i]["first"] is None:
                    marks[i]["first"] = now
                    marks[i]["first_n"] = len(item.ids)
                marks[i]["n"] += len(item.ids)
                marks[i]["last"] = now
            else:
                done[i].set()
        return put

    for i in range(clients):
        backend.submit(image, DecodingOptions(max_new_tokens=tokens), deliver(i))
    for event in done:
        if not event.wait(1800):
            raise TimeoutError("a bench request did not end")
    out = []
    for m in marks:
        decoded = m["n"] - m.get("first_n", 0)
        ms = 1000 * (m["last"] - m["first"]) / decoded if decoded > 0 else None
        out.append({"output_tokens": m["n"], "ms_per_token": ms})
    return out


def _engine(model: str, device: str, image: Any, tokens: int, random_weights: bool = False) -> dict:
    from vlm_service.config import VlmConfig, engine_options
    from vlm_service.transformers_backend import TransformersVisionBackend

    b = TransformersVisionBackend(model, device=device, engine=engine_options(VlmConfig()), random_weights=random_weights)
    b.load()
    b.warmup()
    try:
        b.engine.times.by_rows.clear()
        one = _decode(b, image, tokens)[0]
        host_1 = b.engine.times.host_ms(1)
        b.engine.times.by_rows.clear()
        eight = _decode(b, image, tokens, clients=8)
        host_8 = b.engine.times.host_ms(8)
        counts = count_engine_steps(b, [image])
        return {"ms_per_token": one["ms_per_token"], "output_tokens": one["output_tokens"],
                "ms_per_token_8_clients": statistics.median(r["ms_per_token"] for r in eight if r["ms_per_token"]),
                "host_ms_per_step": {"1": host_1, "8": host_8},
                "ops_per_step": {str(k): v["ops"] for k, v in counts.items()},
                "syncs_per_step": {str(k): v["reads"] for k, v in counts.items()},
                "capture": b.engine.runner.capture}
    finally:
        b.close()


def eager_step(model: str, device: str, image_png: bytes, tokens: int, random_weights: bool = False) -> dict:
    """The engine with its decode step eager (``--engine-capture none``), one request: ms per output token,
    against which the captured step's number (the service's) reads. Public APIs only."""
    from PIL import Image

    from vlm_service.config import VlmConfig, engine_options
    from vlm_service.transformers_backend import TransformersVisionBackend

    b = TransformersVisionBackend(model, device=device, engine=engine_options(VlmConfig(engine_capture="none")),
                                  random_weights=random_weights)
    b.load()
    b.warmup()
    try:
        one = _decode(b, Image.open(io.BytesIO(image_png)).convert("RGB"), tokens)[0]
        return {"ms_per_token": one["ms_per_token"], "output_tokens": one["output_tokens"], "path": b.serving_path}
    finally:
        b.close()


def _generate(model: str, device: str, image: Any, tokens: int, random_weights: bool = False) -> dict:
    """generate(): ms per token; host work per step = (call - prefill - forwards) / steps, and its ops and
    reads per step with the model's forward left out (counted over one whole call, divided by its steps)."""
    from vlm_service.transformers_backend import TransformersVisionBackend

    b = TransformersVisionBackend(model, device=device, engine=None, random_weights=random_weights)
    b.load()
    b.warmup()
    try:
        one = _decode(b, image, tokens)[0]
        counter = HostWorkCounter()
        forward = b.model.forward
        spent = {"forward": 0.0, "calls": 0}

        @functools.wraps(forward)  # generate() reads the forward's signature
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return forward(*args, **kwargs)
            finally:
                spent["forward"] += time.perf_counter() - started
                spent["calls"] += 1

        inputs = b.prepare_inputs(image)

        def timed_run() -> tuple[int, float]:
            started = time.perf_counter()
            n = _decode_inline(b, inputs, tokens)
            return n, time.perf_counter() - started

        def counted_run() -> int:
            with counter.counting():  # on the model thread: dispatch modes are per thread
                return _decode_inline(b, inputs, tokens)

        try:
            b.model.forward = timed
            res, wall = b.worker.run(timed_run)
            b.model.forward = counter.excluded(forward)
            b.worker.run(counted_run)
        finally:
            b.model.forward = forward
        steps = max(1, res)  # one forward per output token (the first one is the prefill)
        return {"ms_per_token": one["ms_per_token"], "output_tokens": one["output_tokens"],
                "host_ms_per_step": {"1": 1000 * (wall - spent["forward"]) / max(1, spent["calls"]), "8": None},
                "ops_per_step": {"1": counter.op_count / steps}, "syncs_per_step": {"1": counter.read_count / steps}}
    finally:
        b.close()


def _decode_inline(backend: Any, inputs: dict, tokens: int) -> int:
    """One reference request run directly on the model thread (we are on it); returns its output tokens."""
    from vlm_service.engine_request import EngineRequest
    from vlm_service.messages import Tokens

    got = []
    req = EngineRequest(inputs=inputs, max_new_tokens=tokens, temperature=0.0, top_p=1.0, seed=None,
                        deliver=lambda item: got.extend(item.ids) if isinstance(item, Tokens) else None)
    backend.generate_reference(req)
    return len(got)


def compare(model: str, device: str, image_png: bytes, tokens: int, threads: int | None = None,
            random_weights: bool = False) -> dict:
    """``random_weights``: the model's architecture with random weights made on the device (a skeleton
    checkpoint, as the bench's VLM service gets it)."""
    import torch
    from PIL import Image

    if threads:
        torch.set_num_threads(threads)
    image = Image.open(io.BytesIO(image_png)).convert("RGB")
    return {"threads": torch.get_num_threads(), "tokens": tokens,
            "engine": _engine(model, device, image, tokens, random_weights),
            "generate": _generate(model, device, image, tokens, random_weights)}
