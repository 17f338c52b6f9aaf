"""The engine's model runner: owns the forward over the row cache, its step inputs and its captured shapes.

A decode step is one forward of ``Qwen2_5_VLForConditionalGeneration`` over rows ``0..B-1`` with ``T`` new
tokens each, attending over the first ``Lb`` cache slots, returning the logits at each row's last real
token. Everything that varies between steps is read from one preallocated input buffer (tokens, where
each row writes, its rope offset, which position's logits to keep), so one shape runs with the same
kernels and the same addresses every time:

- ``capture="none"``: the eager forward (the path the CPU tests run);
- ``capture="compile"``: ``torch.compile(mode="reduce-overhead", dynamic=False)`` of that forward (CUDA
  graphs under the hood on CUDA), one compiled graph per bucket shape, all compiled during warm-up;
- ``capture="cuda-graph"``: an explicit ``torch.cuda.CUDAGraph`` per bucket shape reading the input
  buffer, captured during warm-up and replayed per step (the default on CUDA: ``capture="auto"``).
Warm-up runs every bucket shape, so no request ever triggers a compile or a capture. If capturing fails
at warm-up, the runner logs why and runs eager (:attr:`ModelRunner.capture` says which was decided).
Prefill (one request at a time, with the image, optionally in chunks) stays eager.

Step inputs: the engine writes them through numpy views of one host buffer (pinned on CUDA), and
:meth:`ModelRunner.decode` sends the whole buffer to the device in one copy (none on CPU, where the host
buffer is the device buffer).
"""
from __future__ import annotations

import itertools
import logging
import time
from typing import Any

log = logging.getLogger(__name__)


def resolve_capture(requested: str, device_type: str) -> str:
    """"auto" captures CUDA graphs on CUDA and runs eager elsewhere; an explicit choice is kept."""
    if requested == "auto":
        return "cuda-graph" if device_type == "cuda" else "none"
    return requested


class StepInputs:
    """One int64 buffer for everything a decode step reads: ``tokens [B, T]``, ``history_at [B, T]`` (where each
    token goes in the engine's repetition-penalty history), ``base``, ``delta``, ``last [B]``.
    ``host_*`` are numpy views for the engine to fill; ``device_*`` are the tensors the forward reads."""

    def __init__(self, max_batch: int, max_width: int, device: Any) -> None:
        import torch

        self.max_batch, self.max_width = max_batch, max_width
        size = max_batch * (2 * max_width + 3)
        on_cuda = device.type == "cuda"
        self.host = torch.zeros(size, dtype=torch.long, pin_memory=on_cuda)
        self.device_buffer = torch.zeros(size, dtype=torch.long, device=device) if on_cuda else self.host
        self.copy_needed = on_cuda
        self.host_tokens, self.host_history_at, self.host_base, self.host_delta, self.host_last = self._split(
            self.host.numpy())
        self.device_tokens, self.device_history_at, self.device_base, self.device_delta, self.device_last = self._split(
            self.device_buffer)
        self._views: dict[tuple[int, int], tuple] = {}
        # Recorded after each copy, waited on before the host buffer is written again: a step whose rows
        # all choose nothing returns without a sync, and the next step's host writes could otherwise
        # overwrite the buffer before the asynchronous copy has read it (holes in the KV cache).
        self._staged = torch.cuda.Event() if on_cuda else None

    def _split(self, flat):
        b, t = self.max_batch, self.max_width
        n = b * t
        return (flat[:n].reshape(b, t), flat[n : 2 * n].reshape(b, t), flat[2 * n : 2 * n + b],
                flat[2 * n + b : 2 * n + 2 * b], flat[2 * n + 2 * b : 2 * n + 3 * b])

    def stage(self) -> None:
        """Send the filled host buffer to the device (one copy; asynchronous from pinned memory)."""
        if self.copy_needed:
            self.device_buffer.copy_(self.host, non_blocking=True)
            self._staged.record()

    def wait_staged(self) -> None:
        """Block until the last :meth:`stage` copy has read the host buffer: call before writing it."""
        if self._staged is not None:
            self._staged.synchronize()

    def views(self, batch: int, width: int) -> tuple:
        """Device ``(tokens, history_at, base, delta, last)`` for a shape; the same tensors every time (captured
        graphs read their addresses)."""
        key = (batch, width)
        got = self._views.get(key)
        if got is None:
            got = (self.device_tokens[:batch, :width], self.device_history_at[:batch, :width], self.device_base[:batch],
                   self.device_delta[:batch], self.device_last[:batch])
            self._views[key] = got
        return got


class ModelRunner:
    def __init__(self, model: Any, cache: Any, options: Any) -> None:
        import torch

        self.model, self.cache, self.options = model, cache, options
        self.device = model.device
        self.capture = resolve_capture(options.capture, self.device.type)
        if self.capture == "cuda-graph" and self.device.type != "cuda":
            raise ValueError("capture=cuda-graph needs a CUDA device")
        if options.attention in ("gqa", "flex"):
            from vlm_service.attention import use_row_cache_attention

            use_row_cache_attention(model, options.attention)
        if options.attention == "flex" and any(b % 128 for b in options.length_buckets):
            raise ValueError("attention=flex needs length buckets that are multiples of 128")
        self.block_masks = options.attention == "flex"
        if self.block_masks and self.device.type == "cuda":
            self._allow_recompiles()  # flex_attention is compiled once per step shape
        attn = getattr(model.config.text_config, "_attn_implementation", "sdpa")
        self.additive_mask = attn == "eager"
        self.inputs = StepInputs(options.max_batch, options.token_buckets[-1], self.device)
        self._slots = torch.arange(options.max_len, device=self.device)
        self._rows = torch.arange(options.max_batch, device=self.device)
        self._graphs: dict[tuple[int, int, int], Any] = {}
        self._compiled = None
        self.capture_error: str | None = None  # why capture was given up at warm-up, if it was

    def _setup_compile(self) -> None:
        import torch

        kwargs = {"dynamic": False, "fullgraph": False}
        if self.options.compile_backend:
            kwargs["backend"] = self.options.compile_backend
        elif self.device.type == "cuda":
            kwargs["mode"] = "reduce-overhead"
        self._compiled = torch.compile(self.forward, **kwargs)
        self._allow_recompiles()
        if self.device.type == "cuda":
            for k, v in zip(self.cache.keys, self.cache.values):  # fixed addresses: no copies into graph inputs
                torch._dynamo.mark_static_address(k)
                torch._dynamo.mark_static_address(v)

    def _allow_recompiles(self) -> None:
        """One compiled graph per bucket shape (the step's, or flex attention's): dynamo's default limit (8)
        would quietly fall back to eager after the eighth."""
        import torch._dynamo.config as dynamo_config

        needed = len(self.shapes()) + 8
        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
            if getattr(dynamo_config, name, needed) < needed:
                setattr(dynamo_config, name, needed)

    # -- the forward -------------------------------------------------------------------------------

    def _mask(self, allowed):
        """Boolean "may attend" -> what the attention implementation wants (additive for eager)."""
        import torch

        if not self.additive_mask:
            return allowed
        zero = torch.zeros((), dtype=self.model.dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.finfo(self.model.dtype).min)

    def forward(self, tokens, base, delta, last, batch: int, width: int, span: int):
        """Logits ``[batch, vocab]`` at row ``b``'s token ``last[b]`` after writing ``width`` tokens per row
        at slots ``base[b] ..``; positions ``slot + delta[b]`` (Qwen2.5-VL text tokens: same on all 3 axes)."""
        write = base[:, None] + self._slots[None, :width]  # [B, T]
        positions = (write + delta[:, None]).unsqueeze(0).expand(3, -1, -1)  # [3, B, T]
        if self.block_masks:  # each row's real length, in 128-slot blocks (vlm_service.attention)
            from vlm_service.attention import row_block_mask

            mask = row_block_mask(write, span)
        else:
            mask = self._mask(self._slots[None, None, None, :span] <= write[:, None, :, None])  # [B, 1, T, Lb]
        view = self.cache.view(slice(0, batch), write, span)
        out = self.model.model(input_ids=tokens, position_ids=positions, past_key_values=view, use_cache=True,
                               attention_mask={"full_attention": mask})
        # The LM head only where a choice is made (one position per row): a [B*T, vocab] head would cost
        # T times the work and memory for logits nobody reads.
        return self.model.lm_head(out.last_hidden_state[self._rows[:batch], last])

    # -- prefill -----------------------------------------------------------------------------------

    def prefill(self, slot: int, ids, positions, start: int, *, embeds=None, **vision):
        """Write the KV of ``ids`` ([1, T]; or of ``embeds`` [1, T, hidden]) into row ``slot`` from slot
        ``start`` on; logits [1, V] of the last token. ``positions``: the 3-D rope positions of these tokens
        ([3, 1, T], from ``get_rope_index``)."""
        import torch

        width = int(ids.shape[1]) if embeds is None else int(embeds.shape[1])
        span = start + width
        write = (start + torch.arange(width, device=self.device))[None, :]
        allowed = self._slots[None, None, None, :span] <= write[:, None, :, None]
        view = self.cache.view(slice(slot, slot + 1), write, span)
        mask = {"full_attention": self._mask(allowed)}
        with torch.inference_mode():
            if embeds is not None:  # a chunk of a prompt whose image is already in its embeddings
                out = self.model.model(inputs_embeds=embeds, position_ids=positions, attention_mask=mask,
                                       past_key_values=view, use_cache=True)
                return self.model.lm_head(out.last_hidden_state[:, -1, :])
            out = self.model(input_ids=ids, position_ids=positions, attention_mask=mask, past_key_values=view,
                             use_cache=True, logits_to_keep=1, **vision)
        return out.logits[:, -1, :]

    # -- decode ------------------------------------------------------------------------------------

    def decode(self, batch: int, width: int, span: int):
        """One step at a bucket shape over what the engine wrote into :attr:`inputs` (staged here). The
        logits are only valid until the next step (a captured graph's output buffer is reused)."""
        import torch

        self.inputs.stage()
        tokens, _, base, delta, last = self.inputs.views(batch, width)
        graph = self._graphs.get((batch, width, span))
        if graph is not None:
            static_out, g = graph
            g.replay()
            return static_out
        with torch.inference_mode():
            if self._compiled is None:
                return self.forward(tokens, base, delta, last, batch=batch, width=width, span=span)
            if self.device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are no longer used
            return self._compiled(tokens, base, delta, last, batch=batch, width=width, span=span)

    # -- warm-up -----------------------------------------------------------------------------------

    def shapes(self) -> list[tuple[int, int, int]]:
        o = self.options
        return list(itertools.product(o.batch_buckets, o.token_buckets, o.length_buckets))

    def warm(self) -> int:
        """Run every bucket shape, capturing or compiling it when asked; if that fails, log why and run
        eager from now on. The rows' contents are junk afterwards: call before any request is admitted."""
        import torch

        started = time.perf_counter()
        try:
            if self.capture == "compile" and self._compiled is None:
                self._setup_compile()
            self._warm_shapes()
        except Exception as exc:  # noqa: BLE001 - any capture failure: eager is always correct
            if self.capture == "none" and not self.block_masks:
                raise
            self.capture_error = f"{type(exc).__name__}: {exc}"
            log.warning("decode step capture (%s) failed at warm-up, running eager: %s", self.capture,
                        self.capture_error)
            self.fall_back_to_eager()
            self._warm_shapes()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        log.info("decode step warm (%s) at %d shapes in %.1f s", self.capture, len(self.shapes()),
                 time.perf_counter() - started)
        return len(self.shapes())

    @property
    def path(self) -> str:
        """The decode step that serves: "cuda-graph", "compile" or "eager"."""
        return "eager" if self.capture == "none" else self.capture

    def self_check(self) -> str | None:
        """Each captured or compiled step shape against the eager forward on the same staged inputs (every
        row at its own length, its last token at its own place): None when all agree within
        :func:`serving.fast_path.tolerance` of the model's dtype, else what differed (both logged). The
        rows' contents are junk afterwards: call before any request is admitted."""
        import torch

        from serving.fast_path import compare, tolerance

        if self.capture == "none":
            return None
        tol, inputs = tolerance(self.model.dtype), self.inputs
        vocab = int(self.model.config.text_config.vocab_size)
        for batch, width, span in self.shapes():
            inputs.wait_staged()
            rows, cols = self._rows[:batch].cpu().numpy()[:, None], self._slots[:width].cpu().numpy()[None, :]
            inputs.host_tokens[:batch, :width] = (rows * 7919 + cols * 104729 + span) % vocab
            inputs.host_base[:batch] = (rows[:, 0] * 97 + 13) % (span - width + 1)
            inputs.host_delta[:batch] = rows[:, 0] % 3
            inputs.host_last[:batch] = (width - 1 - rows[:, 0]) % width
            try:
                fast = self.decode(batch, width, span).float().clone()
                tokens, _, base, delta, last = inputs.views(batch, width)
                with torch.inference_mode():
                    eager = self.forward(tokens, base, delta, last, batch=batch, width=width, span=span).float()
            except Exception as exc:  # noqa: BLE001 - a fast path that fails is no fast path
                return f"shape (batch {batch}, tokens {width}, span {span}) failed: {type(exc).__name__}: {exc}"
            problem = compare(fast, eager, tol, rows_argmax=True)
            if problem is not None:
                log.error("self-check of the %s step at (batch %d, tokens %d, span %d): %s; %s argmax %s max %.4g, "
                          "eager argmax %s max %.4g", self.capture, batch, width, span, problem, self.capture,
                          fast.argmax(-1).tolist(), float(fast.abs().max()), eager.argmax(-1).tolist(),
                          float(eager.abs().max()))
                return f"shape (batch {batch}, tokens {width}, span {span}): {problem}"
        return None

    def fall_back_to_eager(self) -> None:
        """The plain step from now on: no graphs, no compiled forward, and with attention=flex the plain "gqa"
        attention registered again (the flex kernel is compiled on CUDA: the fallback must not call it)."""
        self.capture, self._compiled, self._graphs = "none", None, {}
        if self.block_masks:
            from vlm_service.attention import use_row_cache_attention

            use_row_cache_attention(self.model, "gqa")
            self.block_masks = False

    def _warm_shapes(self) -> None:
        inputs = self.inputs
        inputs.wait_staged()
        inputs.host_tokens[:] = 0
        inputs.host_base[:] = 0
        inputs.host_delta[:] = 0
        inputs.host_last[:] = 0
        for batch, width, span in self.shapes():
            if self.capture == "cuda-graph":
                self._capture(batch, width, span)
            else:
                runs = 3 if self._compiled is not None else 1  # reduce-overhead records on the 2nd/3rd call
                for _ in range(runs):
                    self.decode(batch, width, span)

    def _capture(self, batch: int, width: int, span: int) -> None:
        import torch

        self.inputs.stage()
        tokens, _, base, delta, last = self.inputs.views(batch, width)
        args = (tokens, base, delta, last)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.inference_mode(), torch.cuda.stream(stream):
            for _ in range(2):  # let lazy initialisation and autotuning happen outside the capture
                self.forward(*args, batch=batch, width=width, span=span)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if not hasattr(self, "_pool"):
            self._pool = torch.cuda.graph_pool_handle()
        # thread_local: a CUDA call from another thread during the capture (the grammar thread, an
        # empty_cache in some error handling) fails there, instead of spoiling this capture.
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            static_out = self.forward(*args, batch=batch, width=width, span=span)
        self._graphs[(batch, width, span)] = (static_out, graph)
