"""Counting the host work of one decode step: tensor ops dispatched and reads from the device, with the
model forward itself left out (the test in tests/integration/test_vlm_host_work.py and the bench use it).

Ops are counted with a ``TorchDispatchMode`` (every aten op that reaches the dispatcher, views included).
A read from the device is what makes the host wait for it: ``.item()`` and everything built on it (``int(t)``,
``bool(t)``: ``aten._local_scalar_dense``), ``aten.nonzero`` (its output size depends on the data),
``.tolist()``, ``.numpy()`` and ``.cpu()``, intercepted on ``torch.Tensor``. On CPU nothing waits, but the
same calls are the syncs on CUDA, so the counts carry over.
"""
from __future__ import annotations

import contextlib
import functools
from collections import Counter
from typing import Any, Callable, Iterator

READ_OPS = ("_local_scalar_dense", "nonzero")
READ_METHODS = ("tolist", "numpy", "cpu")


class HostWorkCounter:
    """``with counter.counting(): ...`` counts; wrap the forward with :meth:`excluded` to leave it out."""

    def __init__(self) -> None:
        self.ops: Counter = Counter()
        self.reads: Counter = Counter()
        self._paused = 0

    @property
    def op_count(self) -> int:
        return sum(self.ops.values())

    @property
    def read_count(self) -> int:
        return sum(self.reads.values())

    def reset(self) -> None:
        self.ops.clear()
        self.reads.clear()

    def excluded(self, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            self._paused += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._paused -= 1

        return wrapper

    @contextlib.contextmanager
    def counting(self) -> Iterator["HostWorkCounter"]:
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if not counter._paused:
                    name = func.overloadpacket.__name__
                    counter.ops[name] += 1
                    if name in READ_OPS:
                        counter.reads[name] += 1
                return func(*args, **(kwargs or {}))

        originals = {name: getattr(torch.Tensor, name) for name in READ_METHODS}

        def reader(name: str, original: Callable) -> Callable:
            def read(tensor, *args, **kwargs):
                if not counter._paused:
                    counter.reads[name] += 1
                return original(tensor, *args, **kwargs)

            return read

        for name, original in originals.items():
            setattr(torch.Tensor, name, reader(name, original))
        try:
            with Mode():
                yield self
        finally:
            for name, original in originals.items():
                setattr(torch.Tensor, name, original)


def count_engine_steps(backend: Any, images: list, batches: tuple[int, ...] = (1, 8),
                       temperature: float = 0.0) -> dict[int, dict]:
    """On the backend's model thread, with no request running: for each batch size, admit that many requests
    (greedy, or sampled at ``temperature`` with seeds 0, 1, ...), step until every prompt is in, then count one
    decode step with the forward excluded. Returns ``{batch: {"ops": n, "reads": n, "op_names": {...},
    "read_names": {...}, "rows": n}}``. The rows are cancelled afterwards."""
    from vlm_service.engine_request import EngineRequest
    from vlm_service.scheduler import plan_step

    engine = backend.engine
    counter = HostWorkCounter()
    runner = engine.runner
    out: dict[int, dict] = {}

    def job() -> None:
        runner.forward = counter.excluded(runner.forward)  # the eager step's forward (an instance attribute)
        try:
            for batch in batches:
                admit = [EngineRequest(inputs=backend.prepare_inputs(images[i % len(images)]), max_new_tokens=10_000,
                                       temperature=temperature, top_p=0.9, seed=i, deliver=lambda item: None)
                         for i in range(batch)]
                engine.run(plan_step(engine, admit))
                while any(r is not None and r.prompt_left for r in engine.rows):
                    engine.run(plan_step(engine, []))  # chunked prefills done: the counted step only decodes
                counter.reset()
                with counter.counting():
                    engine.run(plan_step(engine, []))
                out[batch] = {"ops": counter.op_count, "reads": counter.read_count,
                              "op_names": dict(counter.ops), "read_names": dict(counter.reads),
                              "rows": sum(r is not None and r.decoding for r in engine.rows)}
                engine.cancel_all()
        finally:
            del runner.forward

    backend.worker.run(job)
    return out
