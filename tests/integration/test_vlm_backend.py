"""TransformersVisionBackend on the tiny random Qwen2.5-VL checkpoint (real classes, CPU), loaded from disk
through the production loader."""

from __future__ import annotations

import json
import math

import jsonschema
import numpy as np
import pytest
from PIL import Image

from vlm_prompt import load_prompt
from tests.vlm_fixtures import description_schema
from i2s_formats.source_merge import merge_sources
from vlm_service import rules
from serving.errors import InvalidInput, NotReady
from vlm_service.backend import (
    DecodingOptions,
    DescriptionDone,
    SceneHeader,
    SourceFound,
)
from vlm_service.transformers_backend import TransformersVisionBackend, render_chatml, visual_token_count

MAX_NEW_TOKENS = 1024  # the tiny model needs ~600-700 tokens for the minimum of three sources


@pytest.fixture(scope="module")
def backend(tiny_vlm_dir):
    b = TransformersVisionBackend(str(tiny_vlm_dir))
    assert not b.ready
    b.load()
    b.warmup()
    yield b
    b.close()


@pytest.fixture(scope="module")
def image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def greedy(backend, image):
    return list(backend.stream(image, DecodingOptions(max_new_tokens=MAX_NEW_TOKENS)))


# -- options (no model) -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_new_tokens=0),
        dict(max_new_tokens=2049),
        dict(max_new_tokens=1.5),
        dict(temperature=-0.1),
        dict(temperature=2.5),
        dict(temperature=math.nan),
        dict(top_p=0.0),
        dict(top_p=1.01),
        dict(top_p=math.inf),
        dict(seed=2**63),
    ],
)
def test_out_of_range_options_cannot_be_made(kwargs):
    with pytest.raises(InvalidInput):
        DecodingOptions(**kwargs)


def test_the_edges_are_accepted():
    for kwargs in ({}, dict(max_new_tokens=1, temperature=2.0, top_p=1e-6, seed=-5),
                   dict(max_new_tokens=2048, temperature=0, top_p=1)):
        assert DecodingOptions(**kwargs).max_new_tokens == kwargs.get("max_new_tokens", 1024)


def test_not_loaded_backend_refuses(image):
    b = TransformersVisionBackend("unused/never-loaded")
    with pytest.raises(NotReady):
        b.stream(image, DecodingOptions())
    with pytest.raises(ValueError):
        TransformersVisionBackend("x", min_pixels=10_000, max_pixels=5_000)


# -- checkpoint and loading ---------------------------------------------------------------------------


def test_tiny_checkpoint_mirrors_the_hub_layout(tiny_vlm_dir):
    for name in ("config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.json", "model.safetensors"):
        assert (tiny_vlm_dir / name).is_file(), name
    pre = json.loads((tiny_vlm_dir / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "Qwen2VLImageProcessor"
    assert (pre["patch_size"], pre["merge_size"], pre["temporal_patch_size"]) == (14, 2, 2)
    gen = json.loads((tiny_vlm_dir / "generation_config.json").read_text())
    assert gen["do_sample"] is True and gen["top_k"] == 1  # the hub defaults the backend overrides
    size = sum(p.stat().st_size for p in tiny_vlm_dir.iterdir())
    assert size < 15_000_000


def test_loads_the_real_classes_with_real_token_ids(backend):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    assert isinstance(backend.model, Qwen2_5_VLForConditionalGeneration)
    assert isinstance(backend.image_processor, Qwen2VLImageProcessorPil)  # no torchvision here
    assert backend.model.config.image_token_id == 151655
    assert backend.model.config.vision_config.patch_size == 14
    assert backend.model.config.vision_config.spatial_merge_size == 2
    tok = backend.tokenizer
    for token, idx in {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                       "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|image_pad|>": 151655,
                       "<|video_pad|>": 151656}.items():
        assert tok.convert_tokens_to_ids(token) == idx
    assert backend.model.get_output_embeddings().weight.shape[0] == 151936
    assert backend.ready
    assert backend.image_processor.size.longest_edge == 512 * 28 * 28


def test_chat_template_matches_chatml(backend):
    assert backend.prompt_text == render_chatml(load_prompt("v1"))


def test_inputs_carry_mm_token_type_ids_for_the_image_tokens(backend, image):
    inputs = backend.prepare_inputs(image)
    n_image = int(inputs["image_grid_thw"][0].prod()) // 4
    assert n_image == visual_token_count(64, 48)
    mm = inputs["mm_token_type_ids"]
    assert mm.shape == inputs["input_ids"].shape
    assert int(mm.sum()) == n_image
    assert bool(((inputs["input_ids"] == 151655) == (mm == 1)).all())


def test_an_image_the_processor_refuses_is_invalid_input(backend):
    """Images reaching the backend passed the contract's limits; one made by hand that the processor cannot
    take (aspect ratio 300, beyond smart_resize's 200) still ends as InvalidInput, not a ValueError."""
    with pytest.raises(InvalidInput):
        backend.stream(Image.new("RGB", (600, 2)), DecodingOptions(max_new_tokens=4))


# -- generation ---------------------------------------------------------------------------------------


def test_greedy_output_is_a_complete_description_that_validates(backend, greedy, image):
    done = greedy[-1]
    assert isinstance(done, DescriptionDone)
    assert done.finish_reason == "stop"
    desc = done.description
    assert desc.sources and desc.scene and desc.mood
    assert desc.prompt_version == "v1" and desc.model_id == backend.model_id
    jsonschema.validate(rules.to_compact_dict(desc), description_schema())
    assert done.prompt_tokens == backend.prepare_inputs(image)["input_ids"].shape[1]
    assert 0 < done.output_tokens <= MAX_NEW_TOKENS
    assert 0 <= done.time_to_first_token_seconds <= done.total_seconds
    # Qwen2.5-VL's 3-D rope was used: with image tokens on a 2-D grid the positions end before the sequence does.
    assert int(backend.model.model.rope_deltas.reshape(-1)[0]) < 0


def test_greedy_is_deterministic(backend, greedy, image):
    again = backend.describe(image, DecodingOptions(max_new_tokens=MAX_NEW_TOKENS))
    assert again.description == greedy[-1].description
    assert again.output_tokens == greedy[-1].output_tokens


def test_sampling_is_deterministic_per_seed(backend, image):
    options = DecodingOptions(max_new_tokens=120, temperature=0.8, top_p=0.95, seed=7)
    first = backend.describe(image, options)
    second = backend.describe(image, options)
    assert first.description == second.description
    assert first.output_tokens == second.output_tokens


def test_stream_order_and_merge(greedy):
    kinds = [type(e) for e in greedy]
    assert kinds[0] is SceneHeader and kinds.count(SceneHeader) == 1
    assert kinds[-1] is DescriptionDone and kinds.count(DescriptionDone) == 1
    assert SourceFound in kinds
    assert all(k is SourceFound for k in kinds[1:-1])
    found = [e.source for e in greedy if isinstance(e, SourceFound)]
    done = greedy[-1]
    assert merge_sources(found) == list(done.description.sources)
    assert (greedy[0].scene, greedy[0].mood) == (done.description.scene, done.description.mood)
    ids = [v.id for s in found for v in s.variants]
    assert len(ids) == len(set(ids))


def test_should_stop_stops_early(backend, image):
    calls = 0

    def should_stop() -> bool:
        nonlocal calls
        calls += 1
        return calls > 5

    events = list(backend.stream(image, DecodingOptions(max_new_tokens=MAX_NEW_TOKENS), should_stop))
    done = events[-1]
    assert isinstance(events[0], SceneHeader)
    assert done.finish_reason == "cancelled"
    assert done.output_tokens == 5  # one poll before generation, then one after each token
    assert done.prompt_tokens > 0

    events = list(backend.stream(image, DecodingOptions(), lambda: True))
    assert [type(e) for e in events] == [SceneHeader, DescriptionDone]
    assert events[-1].output_tokens == 0 and events[-1].finish_reason == "cancelled"


def test_abandoning_a_stream_releases_the_backend(backend, image):
    stream = backend.stream(image, DecodingOptions(max_new_tokens=MAX_NEW_TOKENS))
    assert isinstance(next(stream), SceneHeader)
    stream.close()  # stops the worker and releases the lock
    done = backend.describe(image, DecodingOptions(max_new_tokens=8))
    assert done.finish_reason in {"length", "stop"}


def test_length_limit_keeps_what_was_complete(backend, image):
    done = backend.describe(image, DecodingOptions(max_new_tokens=10))
    assert done.finish_reason == "length"
    assert done.output_tokens == 10
    assert list(done.description.sources) == []
