"""Which path serves a model, and the check that decides it: a fast path proves itself where it runs.

A captured or compiled forward is compared with the eager one on the same inputs before the service says
SERVING (:func:`compare`), on CUDA always and elsewhere when asked (``--self-check``); on a mismatch or a
failure the service serves the eager path. :func:`report` says which path serves in the log, in the
health details (:mod:`serving.health`, on every health answer and the SERVING line) and in the metric
``i2s_fast_path{service,path}`` (1 for the path that serves), which the bench reads before it labels a row.

Tolerances, max |fast - eager| <= atol + rtol * max |eager|: float32 (1e-4, 1e-4): the same arithmetic in
another order (fused or captured kernels) differs by a few ulps, ~1e-6 relative per operation; bfloat16
(0.05, 0.02): an 8-bit mantissa rounds each value by up to 2**-8 (0.4 %), and a 28-layer forward that
fuses or reorders its reductions accumulates several such roundings; float16 (0.01, 0.005): 10-bit
mantissa, four times finer. A wrong graph (stale inputs, a hole in the cache, a wrong kernel) is off by
the logits' own scale, orders of magnitude past these bounds. Per row, the argmax must agree unless the
eager top two are within the bound of each other (a tie at this precision is no mismatch).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from serving import health, metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float


TOLERANCES = {"float32": Tolerance(1e-4, 1e-4), "bfloat16": Tolerance(0.05, 0.02), "float16": Tolerance(0.01, 0.005)}


def tolerance(dtype: Any) -> Tolerance:
    """The tolerance of a torch dtype (or its name); unknown dtypes get bfloat16's, the loosest."""
    return TOLERANCES.get(str(dtype).removeprefix("torch."), TOLERANCES["bfloat16"])


def compare(fast: Any, eager: Any, tol: Tolerance, *, rows_argmax: bool = False) -> str | None:
    """None when ``fast`` matches ``eager`` (tensors of one shape) within ``tol``, else why not. With
    ``rows_argmax`` (logits ``[rows, vocab]``) each row's argmax must agree too (ties within the bound excepted)."""
    import torch

    fast, eager = fast.detach().float(), eager.detach().float()
    if fast.shape != eager.shape:
        return f"shapes differ: {tuple(fast.shape)} against eager {tuple(eager.shape)}"
    if not bool(torch.isfinite(fast).all()):
        return "non-finite values in the fast path's output"
    bound = tol.atol + tol.rtol * float(eager.abs().max())
    delta = float((fast - eager).abs().max())
    if delta > bound:
        return f"max |delta| {delta:.4g} > {bound:.4g} (eager max |x| {float(eager.abs().max()):.4g})"
    if rows_argmax:
        top2 = eager.topk(min(2, eager.shape[-1]), dim=-1).values
        clear = (top2[:, 0] - top2[:, -1]) > bound
        differ = (fast.argmax(-1) != eager.argmax(-1)) & clear
        if bool(differ.any()):
            return f"argmax differs in rows {differ.nonzero().flatten().tolist()}"
    return None


def report(service: str, path: str, reason: str | None = None) -> None:
    """Record the path that serves ``service``: log line, health detail, metric (one path at 1)."""
    metrics.FAST_PATH.clear_service(service)
    metrics.FAST_PATH.labels(service=service, path=path).set(1)
    health.set_detail(f"{service}-path", path)
    if reason:
        health.set_detail(f"{service}-path-reason", reason[:200])
        log.warning("%s serves the %s path: %s", service, path, reason)
    else:
        health.clear_detail(f"{service}-path-reason")
        log.info("%s serves the %s path", service, path)
