"""The VLM decode engine: requests decoded together, one forward per step, on the backend's model thread.

In the manner of text-generation-inference's ``generate_token`` over a batch and gpt-fast's static-cache
decode, with transformers' model classes but our own loop (``generate()`` keeps one batch, one grammar and
the 3-D rope offsets on the model, so requests could neither join nor leave it):

- **Rows.** Each request owns one row of a :class:`~vlm_service.kv_cache.RowKVCache` with its own length,
  its own 3-D rope offset (``rope_delta``, from ``get_rope_index`` at prefill), grammar matcher,
  repetition-penalty row (on the device), sampler, token budget, deadline and cancellation.
- **Who runs is not decided here.** The scheduler (:mod:`vlm_service.scheduler`) reads :attr:`DecodeEngine.rows`
  and hands :meth:`DecodeEngine.run` a :class:`~vlm_service.step_plan.StepPlan` per step: rows to stop,
  requests to admit into which free rows (prefilled whole, or in chunks of ``prefill_chunk`` tokens while
  others decode), the prompt that gets a chunk, the rows that decode. A finished or cancelled row frees its
  slot for the next request (continuous batching).
- **Step.** One forward over the rows ``0..B-1`` (``B`` rounded up to a batch bucket) with ``T`` new tokens
  per row (``T`` rounded up to a token bucket; rows with fewer are padded and the padding masked), over the
  first ``Lb`` cache slots (a length bucket). Shapes come from the small fixed bucket sets only, so the
  step can be captured once per shape at warm-up (:mod:`vlm_service.model_runner`).
- **Host work per step** (what runs on the CPU besides the forward, in the manner of vLLM v1 / SGLang):
  the step's inputs are written into one preallocated buffer and sent in one copy; the grammar masks of
  every row that chooses are filled *while the forward runs* (:mod:`vlm_service.structured_output`); then,
  on the device, the repetition penalty (over each row's token history, fed from the step's own inputs),
  the mask, the argmax or a sampled row's draw (:func:`~vlm_service.sampling.sample_rows`: every sampled
  row of the step at once); one host read of the chosen tokens per step.
- **Jump-forward.** Where the grammar forces the continuation (:meth:`StructuredOutput.forced
  <vlm_service.structured_output.StructuredOutput.forced>`), tokens are appended without a model step each:
  they ride along in the row's next forward (``T > 1``).
- **Prefix cache.** The prompt's text before the image is the same for every request: its keys and values
  are computed once (at warm-up) and copied into each new row, so prefill runs only from the image on.

Greedy decoding here equals ``generate()`` token for token (same processors in the same order: repetition
penalty, grammar mask, then the choice; float32 logits), which the tests check at batch 1 and in mixed
batches. Sampling draws on the device from each row's own seeded generator: a seed gives the same tokens
whatever else is in the batch, but not the reference path's (another random stream). Everything in this
module runs on the model thread, except a request's ``cancelled`` event and the scheduler's queue.
"""
from __future__ import annotations

import logging
import secrets
import time
from concurrent.futures import Future
from typing import Any

import numpy as np

from serving.errors import InvalidInput
from vlm_service.engine_options import EngineOptions
from vlm_service.engine_request import EngineRequest
from vlm_service.messages import Failed, Finished, Tokens
from vlm_service.step_plan import NewRow, StepPlan

log = logging.getLogger(__name__)


def _bucket(value: int, buckets: tuple[int, ...]) -> int | None:
    return next((b for b in buckets if b >= value), None)


class _PendingPrompt:
    """A prompt being prefilled in chunks: its embeddings (image merged in), rope positions, progress."""

    __slots__ = ("embeds", "positions", "done", "total")

    def __init__(self, embeds: Any, positions: Any, done: int, total: int) -> None:
        self.embeds, self.positions, self.done, self.total = embeds, positions, done, total


class Row:
    """One request's row (the scheduler reads ``req``, ``slot``, ``finished``, :attr:`decoding` and
    :attr:`prompt_left`; the engine alone writes)."""

    __slots__ = ("req", "slot", "length", "delta", "matcher", "sampler", "feed", "emitted", "steps", "finished",
                 "prompt")

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
        self.prompt: _PendingPrompt | None = None  # set while its prompt is prefilled in chunks

    @property
    def decoding(self) -> bool:
        """Its prompt is in and it has not ended: it goes through the next decode forward."""
        return self.prompt is None and self.finished is None

    @property
    def prompt_left(self) -> int:
        """Prompt tokens still to prefill in chunks (0: none)."""
        return 0 if self.prompt is None else self.prompt.total - self.prompt.done


class StepTimes:
    """Per number of rows in a step: steps, wall seconds, seconds inside the forward call (for the bench;
    on CPU the forward runs synchronously, so wall - forward is the host work around it)."""

    def __init__(self) -> None:
        self.by_rows: dict[int, list[float]] = {}

    def add(self, rows: int, wall: float, forward: float) -> None:
        entry = self.by_rows.setdefault(rows, [0, 0.0, 0.0])
        entry[0] += 1
        entry[1] += wall
        entry[2] += forward

    def host_ms(self, rows: int) -> float | None:
        entry = self.by_rows.get(rows)
        return 1000 * (entry[1] - entry[2]) / entry[0] if entry else None


class DecodeEngine:
    """Owns the row cache, the model runner and the rows, and runs the scheduler's step plans
    (:meth:`run`; model thread only)."""

    def __init__(self, model: Any, tokenizer: Any, grammar: Any, *, vocab_size: int, stop_ids: list[int],
                 pad_id: int, repetition_penalty: float, prefix_ids: list[int], options: EngineOptions) -> None:
        import torch

        from vlm_service.kv_cache import RowKVCache
        from vlm_service.model_runner import ModelRunner
        from vlm_service.structured_output import StructuredOutput

        self.model, self.tokenizer = model, tokenizer
        self.options = options
        self.vocab_size = vocab_size
        self.stop_ids = set(stop_ids)
        self.pad_id = pad_id
        self.penalty = repetition_penalty
        self.device = model.device
        self.cache = RowKVCache.for_model(model, options.max_batch, options.max_len)
        self.runner = ModelRunner(model, self.cache, options)
        self.inputs = self.runner.inputs
        self.structured = StructuredOutput(grammar, tokenizer, vocab_size=vocab_size, max_rows=options.max_batch,
                                           device=self.device, jump_forward=options.jump_forward)
        self.rows: list[Row | None] = [None] * options.max_batch
        # Repetition-penalty state on the device: each row's token ids so far (prompt, then what it was fed) at
        # their cache slots, as generate() penalises its input_ids; slots past the row's length hold its first
        # prompt token (a repeat changes nothing), and the last ``t_max`` columns take a step's padding.
        t_max = options.token_buckets[-1]
        self.history = torch.zeros(options.max_batch, options.max_len + t_max, dtype=torch.long, device=self.device)
        self._spare = options.max_len + np.arange(t_max)  # where padding goes
        self._offsets = np.arange(t_max)
        self.prefix_ids = list(prefix_ids) if options.prefix_cache else []
        self._prefix_kv: list[tuple[Any, Any]] | None = None
        self.model_steps = 0  # forwards run (prefills and prefill chunks included), for stats
        self.path_reason: str | None = None  # why the step is not the fast path asked for, if it is not
        self.peak_rows = 0  # most rows decoded in one step
        self.times = StepTimes()

    # -- what the scheduler reads ------------------------------------------------------------------

    @property
    def free_slots(self) -> int:
        return sum(r is None for r in self.rows)

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.rows)

    def prompt_work(self, req: EngineRequest) -> int:
        """Prompt tokens ``req``'s prefill would run (its prompt less the cached prefix it starts with)."""
        return int(req.inputs["input_ids"].shape[1]) - self._cached_prefix(req.inputs["input_ids"])

    def _cached_prefix(self, ids: Any) -> int:
        n = len(self.prefix_ids)
        return n if self._prefix_kv is not None and ids[0, :n].tolist() == self.prefix_ids else 0

    # -- running a plan ----------------------------------------------------------------------------

    def run(self, plan: StepPlan) -> None:
        """Carry out one step's plan (:mod:`vlm_service.step_plan`): its stops, its admissions, its prompt
        chunk, then one forward for its decoding rows and each row's next choice; ended rows free their slot."""
        import torch

        with torch.inference_mode():  # the logits are inference tensors, updated in place
            for slot, reason in plan.stop:
                row = self.rows[slot]
                if row is not None and row.finished is None:
                    row.finished = reason
            self._finish_rows()
            for i, new in enumerate(plan.admit):
                try:
                    self._admit(new)
                except BaseException as exc:  # the step breaks (fail_all ends its rows); those not yet admitted end too
                    for later in plan.admit[i + 1 :]:
                        later.req.deliver(Failed(exc))
                    raise
            started = time.perf_counter()
            if plan.chunk is not None:
                self._prefill_chunk(plan.chunk)
                self._finish_rows()
            self._decode(plan.decode, started, chunk_s=time.perf_counter() - started)

    def _admit(self, new: NewRow) -> None:
        """Take the request into its planned row: prefill it whole and choose its first token, or set up its
        chunked prefill (the plans' ``chunk`` runs the chunks)."""
        req, slot = new.req, new.slot
        if self.rows[slot] is not None:  # a scheduler bug: this request fails, the others go on
            req.deliver(Failed(RuntimeError(f"the plan admits into row {slot}, which is taken")))
            return
        row = Row(req, slot)
        req.phases.enter("vlm.prefill")
        try:
            first_logits = self._prefill(row, new.chunked)
        except BaseException as exc:  # noqa: BLE001 - this request fails, the others go on
            req.deliver(Failed(exc))
            return
        self.rows[slot] = row
        if first_logits is not None:
            req.phases.enter("vlm.decode")
            self._choose(first_logits, [(0, row)], self.history[slot : slot + 1, : row.length])
            self._finish_rows()

    def _prefill(self, row: Row, chunked: bool = False):
        """The first logits [1, V], or None when the prompt is left to chunked prefill."""
        import torch

        from vlm_service.sampling import RowSampler

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
        start = self._cached_prefix(ids)
        for layer, (k, v) in enumerate(self._prefix_kv if start else ()):
            self.cache.keys[layer][row.slot, :, :start] = k
            self.cache.values[layer][row.slot, :, :start] = v
        row.delta, row.steps = int(delta.reshape(-1)[0]), 1
        row.matcher = self.structured.matcher(req.grammar)
        if req.temperature > 0:
            seed = req.seed if req.seed is not None else secrets.randbits(63)
            row.sampler = RowSampler(req.temperature, req.top_p, seed)
        self.history[row.slot].fill_(ids[0, 0])
        self.history[row.slot, :total] = ids[0]
        if chunked:
            with torch.inference_mode():
                embeds = self._embed(ids, inputs["pixel_values"], inputs["image_grid_thw"])
            row.prompt = _PendingPrompt(embeds, positions, start, total)
            row.length = start
            return None
        logits = self.runner.prefill(row.slot, ids[:, start:], positions[:, :, start:], start,
                                     pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
        self.model_steps += 1
        row.length = total
        return logits

    def _embed(self, ids, pixel_values, image_grid_thw):
        """The prompt's input embeddings with the vision tower's output in the image tokens' places (what the
        model's own forward does before its decoder), so the prompt can go through the decoder in chunks."""
        import torch

        inner = self.model.model
        embeds = inner.get_input_embeddings()(ids)
        image = inner.get_image_features(pixel_values, image_grid_thw).pooler_output
        image = torch.cat(list(image), dim=0).to(embeds.device, embeds.dtype)
        where = (ids == self.model.config.image_token_id)[..., None].expand_as(embeds)
        return embeds.masked_scatter(where, image)

    def _prefill_chunk(self, slot: int) -> None:
        """The next chunk (at most ``prefill_chunk`` tokens) of row ``slot``'s prompt; its first token is chosen
        after the last chunk."""
        row = self.rows[slot]
        if row is None or row.prompt is None or row.finished is not None:
            return
        p = row.prompt
        end = min(p.done + self.options.prefill_chunk, p.total)
        try:
            logits = self.runner.prefill(row.slot, None, p.positions[:, :, p.done:end], p.done,
                                         embeds=p.embeds[:, p.done:end])
        except BaseException as exc:  # noqa: BLE001 - this request fails, the others go on
            row.prompt, row.finished = None, "error"
            self.rows[row.slot] = None
            row.req.deliver(Failed(exc))
            return
        self.model_steps += 1
        p.done = row.length = end
        if end == p.total:
            row.prompt = None
            row.req.phases.enter("vlm.decode")
            self._choose(logits, [(0, row)], self.history[row.slot : row.slot + 1, : row.length])

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

    def _decode(self, slots: tuple[int, ...], started: float, chunk_s: float) -> None:
        """One forward for the planned rows still decoding, then each row's next choice."""
        live = [r for r in (self.rows[s] for s in slots) if r is not None and r.decoding]
        if not live:
            self._finish_rows()
            return
        opts, inp = self.options, self.inputs
        top = max(r.slot for r in live) + 1
        batch = _bucket(top, opts.batch_buckets)
        t_max = opts.token_buckets[-1]
        counts = [min(len(r.feed), t_max) for r in live]
        width = _bucket(max(counts), opts.token_buckets)
        span = _bucket(max(r.length for r in live) + width, opts.length_buckets)

        # Step inputs, through numpy views of the staging buffer (no tensor op): rows without a token this
        # step (free, finished or still prefilling) write into their row's last slots, which no row reaches.
        inp.wait_staged()  # the last step's copy has read the buffer (no-op on CPU)
        inp.host_tokens[:batch, :width] = self.pad_id
        inp.host_history_at[:batch, :width] = self._spare[:width]
        inp.host_base[:batch] = opts.max_len - width
        inp.host_delta[:batch] = 0
        inp.host_last[:batch] = 0
        for r, n in zip(live, counts):
            inp.host_tokens[r.slot, :n] = r.feed[:n]
            inp.host_history_at[r.slot, :n] = r.length + self._offsets[:n]
            inp.host_base[r.slot], inp.host_delta[r.slot], inp.host_last[r.slot] = r.length, r.delta, n - 1
        # Rows whose whole feed goes through this step choose after it: their grammars already hold every
        # token fed, so their masks can be filled now, on the grammar thread, while the forward runs.
        picks = [(r.slot, r) for r, n in zip(live, counts) if n == len(r.feed)]
        masks = self.structured.fill([(i, r.matcher) for i, r in picks])
        forward_started = time.perf_counter()
        logits = self.runner.decode(batch, width, span)  # launched (asynchronous on CUDA)
        forward_s = time.perf_counter() - forward_started + chunk_s
        self.model_steps += 1
        self.peak_rows = max(self.peak_rows, len(live))

        for r, n in zip(live, counts):
            r.length += n
            r.steps += 1
            del r.feed[:n]
        # The tokens that went in this step join their rows' repetition-penalty state (padding -> spare columns).
        tokens, history_at, *_ = self.inputs.views(batch, width)
        history = self.history[:batch]
        history.scatter_(1, history_at, tokens)
        self._choose(logits, picks, history[:, :span], masks)
        self._finish_rows()
        self.times.add(len(live), time.perf_counter() - started, forward_s)

    def _choose(self, logits, picks: list[tuple[int, Row]], history, masks: Future | None = None) -> None:
        """Next token of each row in ``picks`` ((row of ``logits``, row)): repetition penalty, grammar mask,
        sampler (generate()'s order). ``history``: token ids to penalise, one row per row of ``logits``
        (gathered and scattered back, as generate() does: the work is the rows' length, not the vocabulary).
        ``masks``: the fill of the picks' masks started before the forward (None: fill them now)."""
        import torch

        if not picks:
            return
        scores = logits.float()
        if self.penalty != 1.0:
            picked = scores.gather(1, history)
            scores.scatter_(1, history, torch.where(picked < 0, picked * self.penalty, picked / self.penalty))
        sampled = [(i, row) for i, row in picks if row.sampler is not None]
        # The fill started before the forward, or now.
        (masks or self.structured.fill([(i, row.matcher) for i, row in picks])).result()
        if self.device.type == "cpu":
            chosen = self._choose_on_cpu(scores, picks, sampled)
        else:
            self.structured.apply(scores)
            drawn = scores.argmax(dim=-1)
            if sampled:
                self._draw(scores, sampled, drawn)
            chosen = drawn.tolist()  # the step's one read from the device
        for i, row in picks:
            self._append(row, [chosen[i]])
            if row.finished is None and self.options.jump_forward != "off":
                self._jump_forward(row)

    def _choose_on_cpu(self, scores, picks: list[tuple[int, Row]], sampled: list[tuple[int, Row]]) -> list[int]:
        """The logits already are host memory: the greedy rows' masked argmax in numpy, all rows at once
        (:mod:`vlm_service.masked_argmax`: only the allowed tokens where the grammar allows few, the plain
        argmax checked against the mask where it allows many). Sampled rows draw from the masked scores."""
        import torch

        from vlm_service.masked_argmax import masked_argmax

        host = scores.numpy()  # the step's one read
        chosen = np.zeros(host.shape[0], dtype=np.int64)
        greedy = [i for i, row in picks if row.sampler is None]
        if greedy:
            chosen[greedy] = masked_argmax(host, self.structured.words, greedy, self.vocab_size)
        if sampled:
            self.structured.apply(scores, indices=[i for i, _ in sampled])
            self._draw(scores, sampled, torch.from_numpy(chosen))
        return chosen.tolist()

    @staticmethod
    def _draw(scores, sampled: list[tuple[int, Row]], into) -> None:
        """The sampled rows' tokens into ``into`` (at their rows of ``scores``), all rows in one sampler call."""
        from vlm_service.sampling import sample_rows

        rows = [i for i, _ in sampled]
        into[rows] = sample_rows(scores[rows], [row.sampler for _, row in sampled])

    def _append(self, row: Row, tokens: list[int]) -> None:
        """Accept tokens into the row's grammar, hand them to the request; decide whether it ends. Tokens
        that go on into the model join the penalty state in the step that feeds them."""
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
        if out:
            row.req.deliver(Tokens(tuple(out)))
        if row.finished is None and not self._room(row):
            row.finished = "length"

    def _room(self, row: Row) -> bool:
        """Whether the row may take one more token: its budget, and cache slots for a padded step."""
        return (row.emitted < row.req.max_new_tokens
                and row.length + len(row.feed) + self.options.token_buckets[-1] < self.options.max_len)

    def _jump_forward(self, row: Row) -> None:
        """Append what the grammar forces, without a model step for it (see the module docstring)."""
        while row.finished is None:
            forced = self.structured.forced(row.matcher)
            if not forced:
                return
            self._append(row, forced)

    def _finish_rows(self) -> None:
        for i, r in enumerate(self.rows):
            if r is not None and r.finished is not None:
                self.rows[i] = None
                r.req.phases.end()
                r.req.deliver(Finished(r.finished, r.steps))

    def fail_all(self, exc: BaseException) -> None:
        """A step broke (a bug, a device error): every row in it ends with the error; rows are freed."""
        for i, r in enumerate(self.rows):
            if r is not None:
                self.rows[i] = None
                r.req.deliver(Failed(exc))

    def close(self) -> None:
        """Stop the grammar thread (the backend's release; no step may run after this)."""
        self.structured.close()

    def cancel_all(self, reason: str = "cancelled") -> None:
        for r in self.rows:
            if r is not None and r.finished is None:
                r.finished = reason
        self._finish_rows()

    # -- warm-up -----------------------------------------------------------------------------------

    def warm(self) -> int:
        """Run (and capture, when asked) the step at every bucket shape, and choose the grammar-mask kernel at
        every row count a step applies it to; returns how many step shapes."""
        import torch

        self.compute_prefix()
        shapes = self.runner.warm()
        self.path_reason = self.runner.capture_error
        if self.device.type == "cuda" or self.options.self_check:  # a fast path proves itself where it runs
            problem = self.runner.self_check()
            if problem is not None:
                self.path_reason = f"self-check of the {self.runner.path} step failed: {problem}"
                log.error("%s; serving the eager step", self.path_reason)
                self.runner.fall_back_to_eager()
                self.runner.warm()
        self.structured.warm({1, *self.options.batch_buckets})  # prefill applies it to 1 row, steps to a bucket
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return shapes
