"""VLM side of image-to-sound: Qwen2.5-VL describes what in an image could make sound.

Modules: ``backend`` (the interface and domain events), ``transformers_backend`` (in-process
Qwen2.5-VL with grammar-constrained decoding), ``decoding`` (xgrammar logits processor and the
incremental JSON stream parser), ``rules`` (tolerant parser, the seed's post-rules, seed file format),
``tiny`` (a tiny random Qwen2.5-VL checkpoint for tests and demos).
"""
