"""The host work of one decode step, counted (tiny real Qwen2.5-VL, CPU, greedy, forward excluded).

Bounds (docs/performance.md): at most 16 aten ops outside the forward and exactly 1 read from the device
(the chosen tokens) per step, the same ops at batch 1 and batch 8: the count does not grow with the rows.
Measured on CPU: 14, of which 7 run kernels (penalty history scatter, gather, lt/mul/div/where, scatter
back); the rest are views and no-ops (on CPU the argmax and the mask lookup run in numpy over the same
memory; on a GPU the mask apply and the argmax are two more kernels, and the read is ``tolist``). Before this layout the step ran ~40 ops at batch 1 and ~190 at
batch 8, with several reads.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from bench.host_work import HostWorkCounter, count_engine_steps
from vlm_service.engine_options import EngineOptions
from vlm_service.transformers_backend import TransformersVisionBackend

MAX_OPS = 16


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


WARMED_ROWS: set[int] = set()  # row counts the grammar-mask kernel ran at during warm-up


@pytest.fixture(scope="module")
def both(tiny_vlm_dir):
    options = EngineOptions(max_batch=8, batch_buckets=(1, 2, 4, 8), token_buckets=(1, 4),
                            length_buckets=(1024,), jump_forward="off", prefix_cache=True)
    b = TransformersVisionBackend(str(tiny_vlm_dir), device="cpu", engine=options)
    b.load()
    structured = b.engine.structured
    apply = structured.apply

    def recording(scores, rows=None, indices=None):
        WARMED_ROWS.add(int(scores.shape[0]))
        return apply(scores, rows, indices)

    structured.apply = recording
    b._on_model_thread(b.engine.warm)
    del structured.apply
    b.warmup()
    try:
        images = [_image(i, (48 + 8 * i, 40)) for i in range(8)]
        yield count_engine_steps(b, images), count_engine_steps(b, images, temperature=0.8)
    finally:
        b.close()


@pytest.fixture(scope="module")
def sampled_counts(both):
    return both[1]


@pytest.fixture(scope="module")
def counts(both):
    return both[0]


def test_warm_up_runs_the_mask_kernel_at_every_row_count_a_step_uses(counts):
    assert WARMED_ROWS == {1, 2, 4, 8}


def test_the_counter_sees_ops_and_reads_but_not_what_it_excludes():
    import torch

    counter = HostWorkCounter()
    x = torch.arange(6.0)
    hidden = counter.excluded(lambda t: (t * 2).sum().item())
    with counter.counting():
        y = (x + 1).argmax()
        y.tolist()
        int(y)
        hidden(x)
    assert counter.ops["add"] == 1 and counter.ops["argmax"] == 1 and "mul" not in counter.ops
    assert counter.reads == {"tolist": 1, "_local_scalar_dense": 1}


@pytest.mark.parametrize("batch", [1, 8])
def test_one_decode_step_has_one_read_and_a_bounded_number_of_ops(counts, batch):
    got = counts[batch]
    assert got["rows"] == batch
    assert got["reads"] == 1, got["read_names"]
    assert got["ops"] <= MAX_OPS, got["op_names"]


def test_the_host_work_does_not_grow_with_the_batch(counts):
    assert counts[8]["op_names"] == counts[1]["op_names"]


def test_sampled_rows_read_nothing_more(counts, sampled_counts):
    """Sampling runs on the device (DeviceSampler): still the one read of the chosen tokens per step."""
    for batch in (1, 8):
        assert sampled_counts[batch]["rows"] == batch
        assert sampled_counts[batch]["reads"] == 1, sampled_counts[batch]["read_names"]
    assert sampled_counts[8]["ops"] > sampled_counts[1]["ops"]  # the draws themselves are per sampled row
