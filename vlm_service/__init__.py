"""VLM side of image-to-sound: Qwen2.5-VL describes what in an image could make sound.

Modules: ``backend`` (the interface and domain events), ``transformers_backend`` (in-process Qwen2.5-VL:
loading, inputs, the model thread, the reference ``generate()`` path), ``scheduler`` (the request queue,
admission and decode loop on the model thread), ``engine`` (the decode engine: batched rows, host work per
step, jump-forward, prefix cache, chunked prefill), ``model_runner`` (the engine's forwards and their
captured shapes), ``kv_cache`` (the per-row static KV cache), ``attention`` (grouped-query attention over
it), ``messages`` (what the model thread hands a request's consumer), ``assembly`` (token ids -> stream
events), ``decoding`` (xgrammar helpers, the device sampler and the incremental JSON stream parser),
``rules`` (the seed's post-rules, the compact answer format). The tiny random
checkpoint of tests and demos is built by ``tiny_models.vlm``, outside the installed package.
"""
