"""The VLM decode engine: requests decoded together, one forward per step, on the backend's model thread.

In the manner of text-generation-inference's ``generate_token`` over a batch and gpt-fast's static-cache
decode, with transformers' model classes but our own loop (``generate()`` keeps one batch, one grammar and
the 3-D rope offsets on the model, so requests could neither join nor leave it):

- **Rows.** Each request owns one row of a :class:`~vlm_service.kv_cache.RowKVCache` with its own length,
  its own 3-D rope offset (``rope_delta``, from ``get_rope_index`` at prefill), grammar matcher,
  repetition-penalty set, sampler, token budget, deadline and cancellation. A request that arrives while
  others decode is prefilled alone (batch 1, eager) at the next step boundary and joins the running batch;
  a finished or cancelled one frees its row for the next (continuous batching).
- **Step.** One forward over the rows ``0..B-1`` (``B`` rounded up to a batch bucket) with ``T`` new tokens
  per row (``T`` rounded up to a token bucket; rows with fewer are padded and the padding masked), over the
  first ``Lb`` cache slots (a length bucket). Shapes come from the small fixed bucket sets only, so the
  step can be captured once per shape at warm-up (:mod:`vlm_service.captured_step`).
- **Jump-forward.** Where the grammar forces the continuation, tokens are appended without a model step
  each: they ride along in the row's next forward (``T > 1``). "exact" appends a token only when the grammar
  allows exactly one, so the output is token for token what ``generate()`` gives; "retokenize" takes
  xgrammar's ``find_jump_forward_string`` and appends its canonical tokenization (SGLang's jump-forward:
  more tokens skipped, same JSON text for the forced parts, but other token boundaries).
- **Prefix cache.** The prompt's text before the image is the same for every request: its keys and values
  are computed once (at warm-up) and copied into each new row, so prefill runs only from the image on.

Greedy decoding here equals ``generate()`` token for token (same processors in the same order: repetition
penalty, grammar mask, sampler; float32 logits), which the tests check at batch 1 and in mixed batches.
Everything in this module runs on the model thread, except setting an :class:`EngineRequest`'s
``cancelled`` event and the submission queue (see ``transformers_backend``).
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from serving import tracing
from serving.errors import InvalidInput

log = logging.getLogger(__name__)

JUMP_FORWARD_MODES = ("off", "exact", "retokenize")


@dataclass(frozen=True)
class EngineOptions:
    """How the engine decodes; each fast path has its own switch (the plain path is the reference)."""

    max_batch: int = 8  # rows decoded together (the largest batch bucket)
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8)  # batch sizes a step runs at (captured at warm-up)
    token_buckets: tuple[int, ...] = (1, 8)  # new tokens per row in one step (jump-forward feeds several)
    length_buckets: tuple[int, ...] = (1536, 3072)  # cache slots a step attends over; the last is the row length
    capture: str = "none"  # none | compile (torch.compile reduce-overhead) | cuda-graph
    jump_forward: str = "exact"  # off | exact | retokenize
    prefix_cache: bool = True  # reuse the KV of the prompt text before the image
    compile_backend: str | None = None  # torch.compile backend (None: inductor); tests use "eager" on CPU

    def __post_init__(self) -> None:
        for name in ("batch_buckets", "token_buckets", "length_buckets"):
            buckets = getattr(self, name)
            if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
                raise ValueError(f"{name} must be increasing positive integers, got {buckets!r}")
        if self.batch_buckets[-1] != self.max_batch:
            raise ValueError(f"the largest batch bucket must be max_batch ({self.max_batch})")
        if self.token_buckets[0] != 1:
            raise ValueError("token_buckets must start at 1 (a plain decode step)")
        if self.capture not in ("none", "compile", "cuda-graph"):
            raise ValueError(f"capture must be none, compile or cuda-graph, got {self.capture!r}")
        if self.jump_forward not in JUMP_FORWARD_MODES:
            raise ValueError(f"jump_forward must be one of {JUMP_FORWARD_MODES}, got {self.jump_forward!r}")

    @property
    def max_len(self) -> int:
        return self.length_buckets[-1]


def _bucket(value: int, buckets: tuple[int, ...]) -> int | None:
    return next((b for b in buckets if b >= value), None)


@dataclass
class EngineRequest:
    """What the engine needs of one request. ``inputs`` are CPU tensors (moved to the device here)."""

    inputs: dict[str, Any]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    deliver: Callable[[tuple], None]  # called on the model thread: ("tokens", [ids]) / ("end", reason, steps) / ("error", exc)
    should_stop: Callable[[], bool] | None = None
    deadline: float | None = None  # time.monotonic() after which the request stops ("deadline")
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Made where the request is submitted, on its RPC's task: its trace spans (no-op when tracing is off).
    phases: tracing.Phases = field(default_factory=lambda: tracing.request_phases("vlm.queue_wait"))

    def stop_reason(self) -> str | None:
        if self.cancelled.is_set() or (self.should_stop is not None and self.should_stop()):
            return "cancelled"
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return "deadline"
        return None


class _Row:
    __slots__ = ("req", "slot", "length", "delta", "matcher", "sampler", "feed", "emitted", "steps", "finished")

    def __init__(self, req: EngineRequest, slot: int) -> None:
        self.req, self.slot = req, slot
        self.length = 0  # tokens in the cache
        self.delta = 0  # Qwen2.5-VL rope offset: text position = cache slot + delta
        self.matcher = None
        self.sampler = None
        self.feed: list[int] = []  # tokens chosen but not yet through the model
        self.emitted = 0
        self.steps = 0
        self.finished: str | None = None


class DecodeEngine:
    """Owns the row cache, the step runner and the rows. The backend's decode loop calls :meth:`admit` for
    each waiting request while a row is free and :meth:`step` while rows are active (model thread only)."""

    def __init__(self, model: Any, tokenizer: Any, grammar: Any, *, vocab_size: int, stop_ids: list[int],
                 pad_id: int, repetition_penalty: float, prefix_ids: list[int], options: EngineOptions) -> None:
        import torch
        import xgrammar as xgr

        from vlm_service.captured_step import StepRunner
        from vlm_service.kv_cache import RowKVCache

        self.model, self.tokenizer, self.grammar = model, tokenizer, grammar
        self.options = options
        self.vocab_size = vocab_size
        self.stop_ids = set(stop_ids)
        self.pad_id = pad_id
        self.penalty = repetition_penalty
        self.device = model.device
        self.cache = RowKVCache.for_model(model, options.max_batch, options.max_len)
        self.runner = StepRunner(model, self.cache, options)
        self.rows: list[_Row | None] = [None] * options.max_batch
        self.seen = torch.zeros(options.max_batch, vocab_size, dtype=torch.bool, device=self.device)
        self.bitmask = xgr.allocate_token_bitmask(options.max_batch, vocab_size)
        self._jump_mask = xgr.allocate_token_bitmask(1, vocab_size)  # jump-forward "exact" counts its bits
        self._jump_bits = self._jump_mask.numpy().view("uint8")
        self.prefix_ids = list(prefix_ids) if options.prefix_cache else []
        self._prefix_kv: list[tuple[Any, Any]] | None = None
        self.model_steps = 0  # forwards run (prefills included), for stats
        self.peak_rows = 0  # most rows decoded in one step

    # -- admission ---------------------------------------------------------------------------------

    @property
    def free_slots(self) -> int:
        return sum(r is None for r in self.rows)

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.rows)

    def admit(self, req: EngineRequest) -> None:
        """Prefill ``req`` into a free row (there must be one) and choose its first token."""
        reason = req.stop_reason()
        if reason is not None:  # left while queued: never starts
            req.deliver(("end", reason, 0))
            return
        slot = self.rows.index(None)
        row = _Row(req, slot)
        req.phases.enter("vlm.prefill")
        try:
            first_logits = self._prefill(row)
        except BaseException as exc:  # noqa: BLE001 - this request fails, the others go on
            req.deliver(("error", exc))
            return
        self.rows[slot] = row
        req.phases.enter("vlm.decode")
        self._choose({slot: first_logits})
        self._finish_rows()

    def _prefill(self, row: _Row):
        import xgrammar as xgr

        from vlm_service.decoding import SeededSamplingLogitsProcessor

        req, model, opts = row.req, self.model, self.options
        inputs = {k: v.to(self.device) for k, v in req.inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        ids = inputs["input_ids"]
        total = int(ids.shape[1])
        if total + opts.token_buckets[-1] >= opts.max_len:
            raise InvalidInput(f"the image's prompt of {total} tokens does not fit the engine's rows "
                               f"({opts.max_len} slots); lower max_pixels or raise the engine's max_len")
        positions, delta = model.model.get_rope_index(
            ids, image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"],
            mm_token_type_ids=inputs["mm_token_type_ids"])
        start = 0
        if self._prefix_kv is not None and ids[0, : len(self.prefix_ids)].tolist() == self.prefix_ids:
            start = len(self.prefix_ids)
            for layer, (k, v) in enumerate(self._prefix_kv):
                self.cache.keys[layer][row.slot, :, :start] = k
                self.cache.values[layer][row.slot, :, :start] = v
        logits = self.runner.prefill(row.slot, ids[:, start:], positions[:, :, start:], start,
                                     pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
        self.model_steps += 1
        row.length, row.delta, row.steps = total, int(delta.reshape(-1)[0]), 1
        row.matcher = xgr.GrammarMatcher(self.grammar)
        if req.temperature > 0:
            seed = req.seed if req.seed is not None else secrets.randbits(63)
            row.sampler = SeededSamplingLogitsProcessor(req.temperature, req.top_p, seed)
        self.seen[row.slot].zero_()
        self.seen[row.slot, ids[0]] = True
        return logits

    def compute_prefix(self) -> None:
        """The KV of the prompt text before the image, once (warm-up); reused by every prefill."""
        import torch

        if not self.prefix_ids:
            return
        n = len(self.prefix_ids)
        ids = torch.tensor([self.prefix_ids], device=self.device)
        positions = torch.arange(n, device=self.device).view(1, 1, -1).expand(3, 1, -1)
        self.runner.prefill(0, ids, positions, 0)
        self._prefix_kv = [(k[0, :, :n].clone(), v[0, :, :n].clone()) for k, v in zip(self.cache.keys, self.cache.values)]

    # -- decoding ----------------------------------------------------------------------------------

    def step(self) -> None:
        """One forward for every active row, then each row's next choice; finished rows free their slot."""
        import torch

        self._poll_stops()
        live = [r for r in self.rows if r is not None and r.finished is None]
        if not live:
            self._finish_rows()
            return
        opts = self.options
        top = max(r.slot for r in live) + 1
        batch = _bucket(top, opts.batch_buckets)
        t_max = opts.token_buckets[-1]
        lengths = {r.slot: min(len(r.feed), t_max) for r in live}
        width = _bucket(max(lengths.values()), opts.token_buckets)
        span = _bucket(max(r.length for r in live) + width, opts.length_buckets)

        tokens = torch.full((batch, width), self.pad_id, dtype=torch.long)
        base = torch.zeros(batch, dtype=torch.long)
        delta = torch.zeros(batch, dtype=torch.long)
        last = torch.zeros(batch, dtype=torch.long)
        for r in live:
            n = lengths[r.slot]
            tokens[r.slot, :n] = torch.tensor(r.feed[:n])
            base[r.slot], delta[r.slot], last[r.slot] = r.length, r.delta, n - 1
        logits = self.runner.decode(batch, width, span, tokens, base, delta, last)
        self.model_steps += 1
        self.peak_rows = max(self.peak_rows, len(live))

        choose = {}
        for r in live:
            n = lengths[r.slot]
            r.length += n
            r.steps += 1
            del r.feed[:n]
            if not r.feed:  # the whole feed went through: the logits at its end are a real choice
                choose[r.slot] = logits[r.slot : r.slot + 1]
        self._choose(choose)
        self._finish_rows()

    def _poll_stops(self) -> None:
        for r in self.rows:
            if r is not None and r.finished is None:
                reason = r.req.stop_reason()
                if reason is not None:
                    r.finished = reason

    def _choose(self, logits_by_slot: dict[int, Any]) -> None:
        """Next token of each given row: repetition penalty, grammar mask, sampler (generate()'s order)."""
        import torch
        import xgrammar as xgr

        if not logits_by_slot:
            return
        slots = sorted(logits_by_slot)
        scores = torch.cat([logits_by_slot[s] for s in slots]).float()
        seen = self.seen[slots]
        penalised = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
        scores = torch.where(seen, penalised, scores)
        for i, s in enumerate(slots):
            self.rows[s].matcher.fill_next_token_bitmask(self.bitmask, i)
        mask = self.bitmask[: len(slots)]
        if scores.device.type != "cpu":
            mask = mask.to(scores.device, non_blocking=True)
        try:
            xgr.apply_token_bitmask_inplace(scores, mask, vocab_size=self.vocab_size)
        except (ImportError, RuntimeError):  # e.g. no Triton on this CUDA host
            xgr.apply_token_bitmask_inplace(scores, mask, vocab_size=self.vocab_size, backend="torch_native")
        greedy = scores.argmax(dim=-1).tolist()
        for i in range(len(slots)):
            row = self.rows[slots[i]]
            if row.sampler is not None:
                token = int(row.sampler(None, scores[i : i + 1]).argmax(dim=-1))
            else:
                token = int(greedy[i])
            self._append(row, [token])
            if row.finished is None and self.options.jump_forward != "off":
                self._jump_forward(row)

    def _append(self, row: _Row, tokens: list[int]) -> None:
        """Accept tokens into the row's grammar, hand them to the request; decide whether it ends."""
        out = []
        for token in tokens:
            if not self._room(row):
                row.finished = "length"
                break
            if not row.matcher.accept_token(token):
                raise RuntimeError(f"token {token} rejected by the grammar")
            out.append(token)
            row.emitted += 1
            if token in self.stop_ids or row.matcher.is_terminated():
                row.finished = "stop"
                break
            row.feed.append(token)
            self.seen[row.slot, token] = True
        if out:
            row.req.deliver(("tokens", out))
        if row.finished is None and not self._room(row):
            row.finished = "length"

    def _room(self, row: _Row) -> bool:
        """Whether the row may take one more token: its budget, and cache slots for a padded step."""
        return (row.emitted < row.req.max_new_tokens
                and row.length + len(row.feed) + self.options.token_buckets[-1] < self.options.max_len)

    def _jump_forward(self, row: _Row) -> None:
        """Append what the grammar forces, without a model step for it (see the module docstring)."""
        while row.finished is None:
            forced = row.matcher.find_jump_forward_string()
            if not forced:
                return
            if self.options.jump_forward == "retokenize":
                tokens = self.tokenizer.encode(forced, add_special_tokens=False)
                accepted = []
                probe = row.matcher.fork() if hasattr(row.matcher, "fork") else None
                for t in tokens:  # keep the prefix the grammar takes as tokens (boundaries may not fit)
                    if probe is None or not probe.accept_token(t):
                        break
                    accepted.append(t)
                if not accepted:
                    return
                self._append(row, accepted)
                continue
            row.matcher.fill_next_token_bitmask(self._jump_mask)
            bits = np.unpackbits(self._jump_bits, bitorder="little")  # bit i of the mask: token i allowed
            allowed = np.flatnonzero(bits)
            if len(allowed) != 1:
                return
            self._append(row, [int(allowed[0])])

    def _finish_rows(self) -> None:
        for i, r in enumerate(self.rows):
            if r is not None and r.finished is not None:
                self.rows[i] = None
                r.req.phases.end()
                r.req.deliver(("end", r.finished, r.steps))

    def fail_all(self, exc: BaseException) -> None:
        """A step broke (a bug, a device error): every row in it ends with the error; rows are freed."""
        for i, r in enumerate(self.rows):
            if r is not None:
                self.rows[i] = None
                r.req.deliver(("error", exc))

    def cancel_all(self, reason: str = "cancelled") -> None:
        for r in self.rows:
            if r is not None and r.finished is None:
                r.finished = reason
        self._finish_rows()

    # -- warm-up -----------------------------------------------------------------------------------

    def warm(self) -> int:
        """Run (and capture, when asked) the step at every bucket shape; returns how many shapes."""
        self.compute_prefix()
        return self.runner.warm()
