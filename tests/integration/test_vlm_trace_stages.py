"""The VLM's latency stages as spans, in both decode paths (the engine and the generate() reference), with
the tiny real checkpoint: queue wait, then prefill, then decode, one after the other, under the span of
the request that submitted them (the e2e test checks the whole trace across the three processes)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from serving import tracing
from vlm_service.backend import DecodingOptions, DescriptionDone
from vlm_service.engine_options import EngineOptions
from vlm_service.transformers_backend import TransformersVisionBackend

STAGES = ["vlm.queue_wait", "vlm.prefill", "vlm.decode"]


@pytest.mark.parametrize("engine", [True, False], ids=["engine", "reference"])
def test_queue_wait_prefill_and_decode_follow_each_other_under_the_request(tiny_vlm_dir, spans, engine):
    options = EngineOptions(max_batch=2, batch_buckets=(1, 2), token_buckets=(1,), length_buckets=(1024,),
                            jump_forward="off", prefix_cache=False) if engine else None
    backend = TransformersVisionBackend(str(tiny_vlm_dir), device="cpu", engine=options)
    backend.load()
    backend.warmup()  # no request: makes no spans
    assert spans.get_finished_spans() == ()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    try:
        with tracing._tracer.start_as_current_span("rpc") as rpc:
            events = list(backend.stream(image, DecodingOptions(max_new_tokens=12)))
    finally:
        backend.close()
    assert isinstance(events[-1], DescriptionDone) and events[-1].output_tokens > 0
    finished = {s.name: s for s in spans.get_finished_spans()}
    stages = [finished[name] for name in STAGES]
    for stage in stages:
        assert stage.parent.span_id == rpc.get_span_context().span_id
        assert stage.context.trace_id == rpc.get_span_context().trace_id
    for earlier, later in zip(stages, stages[1:]):
        assert earlier.end_time == later.start_time  # one stage ends where the next begins
    assert stages[-1].end_time <= finished["rpc"].end_time
