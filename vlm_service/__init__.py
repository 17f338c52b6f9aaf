"""VLM side of image-to-sound: Qwen2.5-VL describes what in an image could make sound.

Modules: ``backend`` (the interface and domain events), ``transformers_backend`` (in-process Qwen2.5-VL:
loading, inputs, the model thread, the reference ``generate()`` path), ``engine`` (the decode engine:
batched rows, jump-forward, prefix cache), ``kv_cache`` (the per-row static KV cache), ``captured_step``
(the engine's forwards, eager or captured), ``assembly`` (token ids -> stream events), ``decoding``
(xgrammar helpers and the incremental JSON stream parser), ``rules`` (the seed's post-rules, the compact
answer format), ``triton_backend`` (the same interface against a Triton Inference Server). The tiny random
checkpoint of tests and demos is built by ``tiny_models.vlm``, outside the installed package.
"""
