"""The decode engine's structured output: each row's grammar matcher, the step's token masks, jump-forward
(vLLM v1's structured-output manager, in small). Model thread only, except the mask fill, which runs on
this module's grammar thread while the model thread runs the step's forward.

- **Masks.** The masks of every row that chooses in a step are filled in one batched call (xgrammar's
  ``BatchGrammarMatcher``) on the grammar thread (xgrammar releases the GIL, so this overlaps the forward
  on CPU too); row ``i`` of :attr:`StructuredOutput.bitmask` is the mask of the step's row ``i``. On CUDA the
  CPU mask is pinned and copied to a device twin; the kernel that applies it is chosen once, at warm-up.
- **Jump-forward.** Where the grammar forces the continuation, the engine appends tokens without a model
  step each. "exact" takes a token only when the grammar allows exactly one, so the output is token for
  token what ``generate()`` gives; "retokenize" takes xgrammar's ``find_jump_forward_string`` and its
  canonical tokenization (SGLang's jump-forward: more tokens skipped, the same JSON text for the forced
  parts, other token boundaries).
"""
from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)


class StructuredOutput:
    """Args:
        grammar: the compiled grammar a request gets unless it brings its own.
        tokenizer: for "retokenize" jump-forward.
        vocab_size: the LM head's size (the masks' width).
        max_rows: the engine's rows (the masks' height).
        device: where the logits are (a CUDA device gets a pinned mask and a device twin).
        jump_forward: "off" | "exact" | "retokenize".
    """

    def __init__(self, grammar: Any, tokenizer: Any, *, vocab_size: int, max_rows: int, device: Any,
                 jump_forward: str) -> None:
        import torch
        import xgrammar as xgr

        self.grammar, self.tokenizer, self.vocab_size = grammar, tokenizer, vocab_size
        self.device, self.jump_forward = device, jump_forward
        self.bitmask = xgr.allocate_token_bitmask(max_rows, vocab_size)
        self.device_bitmask = None
        self.backend = "auto"  # xgrammar's own kernel; warm() may choose "torch_native"
        if device.type == "cuda":
            self.bitmask = self.bitmask.pin_memory()
            self.device_bitmask = torch.empty_like(self.bitmask, device=device)
        self.words = self.bitmask.numpy()  # the CPU path reads the masks' bits directly
        self._batch = xgr.BatchGrammarMatcher(max_threads=max(1, torch.get_num_threads()))
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="vlm-grammar")
        self._jump_mask = xgr.allocate_token_bitmask(1, vocab_size)  # "exact" looks at its words
        words = self._jump_mask.numpy()[0]  # scanned as 64-bit words where they pair up: half the length
        self._jump_words = words.view(np.uint64) if len(words) % 2 == 0 else words.view(np.uint32)

    def matcher(self, grammar: Any = None) -> Any:
        """A new row's matcher: of ``grammar``, or of the engine's grammar when None."""
        import xgrammar as xgr

        return xgr.GrammarMatcher(grammar if grammar is not None else self.grammar)

    def fill(self, matchers: Sequence[tuple[int, Any]]) -> Future | None:
        """Starts filling the mask of each (row of :attr:`bitmask`, matcher) in one batched call on the grammar
        thread; the caller waits on the future before reading the masks (None: nothing to fill)."""
        if not matchers:
            return None
        return self._thread.submit(self._batch.batch_fill_next_token_bitmask, [m for _, m in matchers],
                                   self.bitmask, [i for i, _ in matchers])

    def apply(self, scores: Any, rows: int | None = None, indices: list[int] | None = None) -> None:
        """The first ``rows`` masks (all of ``scores``' rows when None) applied to ``scores`` in place, as
        ``-inf``; ``indices``: only those rows. On CUDA the masks go to the device first."""
        rows = int(scores.shape[0]) if rows is None else rows
        mask = self.bitmask[:rows]
        if self.device_bitmask is not None:
            mask = self.device_bitmask[:rows]
            mask.copy_(self.bitmask[:rows], non_blocking=True)
        self._kernel(scores, mask, indices)

    def _kernel(self, scores: Any, mask: Any, indices: list[int] | None) -> None:
        import xgrammar as xgr

        xgr.apply_token_bitmask_inplace(scores, mask, vocab_size=self.vocab_size, indices=indices,
                                        backend=self.backend)

    def forced(self, matcher: Any) -> list[int]:
        """The tokens the grammar forces next (jump-forward; empty when it forces none or the mode is "off")."""
        if self.jump_forward == "off":
            return []
        text = matcher.find_jump_forward_string()
        if not text:  # nothing forced ("exact" asks this first too: a lone stop token is not forced text)
            return []
        if self.jump_forward == "retokenize":
            probe = matcher.fork() if hasattr(matcher, "fork") else None
            accepted = []
            for token in self.tokenizer.encode(text, add_special_tokens=False):
                if probe is None or not probe.accept_token(token):  # keep the prefix the grammar takes as tokens
                    break
                accepted.append(token)
            return accepted
        token = self._only_allowed(matcher)
        return [] if token is None else [token]

    def _only_allowed(self, matcher: Any) -> int | None:
        """The one token the grammar allows next, or None: looks at the mask's words (a handful are nonzero)
        instead of unpacking every token's bit (bit order: little-endian hosts, as xgrammar's kernels)."""
        matcher.fill_next_token_bitmask(self._jump_mask)
        words = np.flatnonzero(self._jump_words)
        if len(words) != 1:
            return None
        word = int(self._jump_words[words[0]])
        if word & (word - 1):  # more than one bit
            return None
        return int(words[0]) * 8 * self._jump_words.itemsize + word.bit_length() - 1

    def warm(self, row_counts: Sequence[int]) -> None:
        """Choose the mask kernel once: xgrammar's own (Triton on CUDA), checked on a known mask at every row
        count a step applies it to; any failure means xgrammar's plain torch path for good."""
        try:
            self._check_kernel(row_counts)
        except Exception as exc:  # noqa: BLE001 - e.g. no Triton, a compiler error: the plain path is correct
            log.warning("grammar-mask kernel failed at warm-up (%s: %s); using xgrammar's torch_native path",
                        type(exc).__name__, exc)
            self.backend = "torch_native"
            self._check_kernel(row_counts)

    def _check_kernel(self, row_counts: Sequence[int]) -> None:
        import torch

        self.bitmask.fill_(0)
        self.bitmask[:, 0] = 1  # only token 0 allowed
        try:
            for rows in sorted(set(row_counts)):
                scores = torch.zeros(rows, self.vocab_size, dtype=torch.float32, device=self.device)
                self.apply(scores)
                if not bool(torch.isinf(scores[:, 1:]).all()) or bool(torch.isinf(scores[:, 0]).any()):
                    raise RuntimeError(f"the mask kernel ({self.backend}) masked {rows} rows wrongly")
        finally:
            self.bitmask.fill_(-1)

    def close(self) -> None:
        """Stop the grammar thread (no step may run after this)."""
        self._thread.shutdown(wait=True)
