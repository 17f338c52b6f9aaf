"""The engine's forwards over the row cache: prefill (eager) and the decode step, plain or captured.

A decode step is one forward of ``Qwen2_5_VLForConditionalGeneration`` over rows ``0..B-1`` with ``T`` new
tokens each, attending over the first ``Lb`` cache slots, returning the logits at each row's last real
token. Everything that varies between steps is a tensor input (tokens, where each row writes, its rope
positions, its mask), so one shape runs with the same kernels every time:

- ``capture="none"``: the eager forward (the path the CPU tests run);
- ``capture="compile"``: ``torch.compile(mode="reduce-overhead", dynamic=False)`` of that forward (CUDA
  graphs under the hood on CUDA), one compiled graph per bucket shape, all compiled during warm-up;
- ``capture="cuda-graph"``: an explicit ``torch.cuda.CUDAGraph`` per bucket shape with static input
  buffers, captured during warm-up and replayed per step.
Warm-up runs every bucket shape, so no request ever triggers a compile or a capture. Prefill (one
request, any length, with the image) stays eager: it runs once per request.
"""
from __future__ import annotations

import itertools
import logging
import time
from typing import Any

log = logging.getLogger(__name__)


class StepRunner:
    def __init__(self, model: Any, cache: Any, options: Any) -> None:
        import torch

        self.model, self.cache, self.options = model, cache, options
        self.device = model.device
        self.eager_attention = getattr(model.config, "_attn_implementation", "sdpa") == "eager"
        self._slots = torch.arange(options.max_len, device=self.device)
        self._graphs: dict[tuple[int, int, int], Any] = {}
        self._compiled = None
        if options.capture != "none" and options.capture == "cuda-graph" and self.device.type != "cuda":
            raise ValueError("capture=cuda-graph needs a CUDA device")
        if options.capture == "compile":
            kwargs = {"dynamic": False, "fullgraph": False}
            if options.compile_backend:
                kwargs["backend"] = options.compile_backend
            elif self.device.type == "cuda":
                kwargs["mode"] = "reduce-overhead"
            self._compiled = torch.compile(self._forward, **kwargs)
            # One compiled graph per bucket shape: dynamo's default limit (8) would quietly fall back to eager.
            import torch._dynamo.config as dynamo_config

            needed = len(self.shapes()) + 8
            for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
                if getattr(dynamo_config, name, needed) < needed:
                    setattr(dynamo_config, name, needed)
            if self.device.type == "cuda":
                for k, v in zip(cache.keys, cache.values):  # fixed addresses: no copies into graph inputs
                    torch._dynamo.mark_static_address(k)
                    torch._dynamo.mark_static_address(v)

    # -- the forward -------------------------------------------------------------------------------

    def _mask(self, allowed):
        """Boolean "may attend" -> what the attention implementation wants (additive for eager)."""
        import torch

        if not self.eager_attention:
            return allowed
        zero = torch.zeros((), dtype=self.model.dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.finfo(self.model.dtype).min)

    def _forward(self, tokens, base, delta, last, batch: int, width: int, span: int, **vision):
        """Logits ``[batch, vocab]`` at row ``b``'s token ``last[b]`` after writing ``width`` tokens per row
        at slots ``base[b] ..``; positions ``slot + delta[b]`` (Qwen2.5-VL text tokens: same on all 3 axes)."""
        import torch

        steps = torch.arange(width, device=tokens.device)
        write = base[:, None] + steps[None, :]  # [B, T]
        positions = (write + delta[:, None]).unsqueeze(0).expand(3, -1, -1)  # [3, B, T]
        allowed = self._slots[None, None, None, :span] <= write[:, None, :, None]  # [B, 1, T, Lb]
        view = self.cache.view(slice(0, batch), write, span)
        out = self.model.model(input_ids=tokens, position_ids=positions, past_key_values=view, use_cache=True,
                               attention_mask={"full_attention": self._mask(allowed)}, **vision)
        # The LM head only where a choice is made (one position per row): a [B*T, vocab] head would cost
        # T times the work and memory for logits nobody reads.
        rows = torch.arange(batch, device=tokens.device)
        return self.model.lm_head(out.last_hidden_state[rows, last])

    # -- prefill -----------------------------------------------------------------------------------

    def prefill(self, slot: int, ids, positions, start: int, **vision):
        """Write the KV of ``ids`` ([1, T]) into row ``slot`` from slot ``start`` on; logits [1, V] of the last
        token. ``positions``: the 3-D rope positions of these tokens ([3, 1, T], from ``get_rope_index``)."""
        import torch

        width = int(ids.shape[1])
        span = start + width
        write = (start + torch.arange(width, device=self.device))[None, :]
        allowed = self._slots[None, None, None, :span] <= write[:, None, :, None]
        view = self.cache.view(slice(slot, slot + 1), write, span)
        with torch.inference_mode():
            out = self.model(input_ids=ids, position_ids=positions, attention_mask={"full_attention": self._mask(allowed)},
                             past_key_values=view, use_cache=True, logits_to_keep=1, **vision)
        return out.logits[:, -1, :]

    # -- decode ------------------------------------------------------------------------------------

    def decode(self, batch: int, width: int, span: int, tokens, base, delta, last):
        """One step at a bucket shape. Inputs are CPU tensors ([B, T] tokens, [B] base/delta/last)."""
        import torch

        key = (batch, width, span)
        args = [t.to(self.device, non_blocking=True) for t in (tokens, base, delta, last)]
        graph = self._graphs.get(key)
        if graph is not None:
            static_in, static_out, g = graph
            for dst, src in zip(static_in, args):
                dst.copy_(src)
            g.replay()
            return static_out.clone()
        with torch.inference_mode():
            if self._compiled is None:
                return self._forward(*args, batch=batch, width=width, span=span)
            if self.device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are no longer used
            # Cloned: a compiled graph's outputs live in its memory pool and the next replay overwrites them.
            return self._compiled(*args, batch=batch, width=width, span=span).clone()

    # -- warm-up -----------------------------------------------------------------------------------

    def shapes(self) -> list[tuple[int, int, int]]:
        o = self.options
        return list(itertools.product(o.batch_buckets, o.token_buckets, o.length_buckets))

    def warm(self) -> int:
        """Run every bucket shape (compiling or capturing it when asked). The rows' contents are junk
        afterwards: call before any request is admitted."""
        import torch

        started = time.perf_counter()
        for batch, width, span in self.shapes():
            tokens = torch.zeros(batch, width, dtype=torch.long)
            base = torch.zeros(batch, dtype=torch.long)
            zeros = torch.zeros(batch, dtype=torch.long)
            if self.options.capture == "cuda-graph":
                self._capture(batch, width, span, tokens, base, zeros)
            else:
                runs = 3 if self._compiled is not None else 1  # reduce-overhead records on the 2nd/3rd call
                for _ in range(runs):
                    self.decode(batch, width, span, tokens, base, zeros, zeros)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        log.info("decode step warm (%s) at %d shapes in %.1f s", self.options.capture, len(self.shapes()),
                 time.perf_counter() - started)
        return len(self.shapes())

    def _capture(self, batch, width, span, tokens, base, zeros) -> None:
        import torch

        static_in = [t.to(self.device) for t in (tokens, base, zeros, zeros.clone())]
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.inference_mode(), torch.cuda.stream(stream):
            for _ in range(2):  # let lazy initialisation and autotuning happen outside the capture
                self._forward(*static_in, batch=batch, width=width, span=span)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if not hasattr(self, "_pool"):
            self._pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self._pool):
            static_out = self._forward(*static_in, batch=batch, width=width, span=span)
        self._graphs[(batch, width, span)] = (static_in, static_out, graph)
