"""Structured output: the xgrammar grammar of the answer (tokenizer info, compiled JSON schema) and the
reference generate() path's logits processor. xgrammar and torch are imported lazily.

xgrammar 0.2.8 facts this module relies on (checked against the installed package):
- ``TokenizerInfo.from_huggingface`` does *not* mark Qwen's added tokens (``<|image_pad|>``,
  ``<|vision_start|>``, ``<|im_start|>``...) as special: inside a JSON string the grammar allows them as
  literal text. :func:`build_tokenizer_info` blanks every added token except the stop tokens, which
  makes xgrammar treat them as special (never allowed).
- ``compile_json_schema`` enforces minLength/maxLength, minItems/maxItems, enum and number
  minimum/maximum (numbers get at most 6 fraction digits, no exponent). With a maxLength, escapes
  (``\\n``, ``\\"``, ``\\uXXXX``) are not allowed inside the string, but raw control characters
  (U+0001, TAB, DEL) are: parse with ``json.loads(strict=False)`` and clean strings afterwards.
- ``GrammarMatcher.accept_token`` returns False for a token the grammar rejects;
  ``fill_next_token_bitmask`` writes into a CPU int32 bitmask from ``allocate_token_bitmask``;
  ``apply_token_bitmask_inplace`` needs logits and bitmask on the same device (CPU kernel on CPU,
  Triton on CUDA).
"""

from __future__ import annotations

import json
from typing import Any, Sequence


def build_tokenizer_info(tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]):
    """xgrammar TokenizerInfo for a Hugging Face tokenizer, with every added token except the stop tokens
    blanked (so xgrammar treats them as special and never lets them into the JSON text).

    ``vocab_size`` is the model's LM-head size (151936 / 152064 for Qwen2.5-VL, more than the tokenizer's).
    """
    import xgrammar as xgr

    stops = [int(t) for t in stop_token_ids]
    detected = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stops)
    added_ids = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    added_ids.update(int(i) for i in (getattr(tokenizer, "all_special_ids", None) or []))
    encoded = [""] * vocab_size
    for token, idx in tokenizer.get_vocab().items():
        if idx < vocab_size and idx not in added_ids:
            encoded[idx] = token
    return xgr.TokenizerInfo(
        encoded,
        vocab_type=detected.vocab_type,
        vocab_size=vocab_size,
        stop_token_ids=stops,
        add_prefix_space=detected.add_prefix_space,
    )


def compile_schema(tokenizer_info: Any, schema: dict) -> Any:
    """Compile the JSON schema into an xgrammar grammar: compact separators, no free whitespace (fewest
    tokens, and a random-weight model cannot wander in whitespace), properties in schema order."""
    import xgrammar as xgr

    compiler = xgr.GrammarCompiler(tokenizer_info, max_threads=2)
    return compiler.compile_json_schema(
        json.dumps(schema), any_whitespace=False, separators=(",", ":"), strict_mode=True
    )


class GrammarLogitsProcessor:
    """Hugging Face logits processor that keeps generation inside an xgrammar grammar (batch size 1).

    On each call it first accepts the tokens generated since the previous call (the last one of
    ``input_ids``), then fills the next-token bitmask and masks the logits in place. One instance per
    generation. Raises RuntimeError if a token outside the grammar shows up (a bug elsewhere).
    """

    def __init__(self, compiled_grammar: Any, vocab_size: int) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.matcher = xgr.GrammarMatcher(compiled_grammar)
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self._vocab_size = vocab_size
        self._prompt_len: int | None = None
        self._accepted = 0
        self._device_mask = None
        self._kernel = "auto"  # xgrammar's choice, until it fails once; then its plain torch kernel, for good

    def __call__(self, input_ids, scores):
        if input_ids.shape[0] != 1:
            raise ValueError("GrammarLogitsProcessor supports batch size 1")
        if self._prompt_len is None:
            self._prompt_len = int(input_ids.shape[1])
        new_tokens = input_ids[0, self._prompt_len + self._accepted :].tolist()
        for token in new_tokens:
            if not self.matcher.accept_token(int(token)):
                raise RuntimeError(f"token {token} rejected by the grammar")
            self._accepted += 1
        if self.matcher.is_terminated():
            return scores
        self.matcher.fill_next_token_bitmask(self._bitmask)
        mask = self._bitmask if scores.device.type == "cpu" else self._bitmask.to(scores.device, non_blocking=True)
        if self._kernel == "auto":
            try:
                self._xgr.apply_token_bitmask_inplace(scores, mask, vocab_size=self._vocab_size)
                return scores
            except Exception:  # noqa: BLE001 - e.g. no Triton on this CUDA host: the plain kernel from now on
                self._kernel = "torch_native"
        self._xgr.apply_token_bitmask_inplace(scores, mask, vocab_size=self._vocab_size, backend=self._kernel)
        return scores
