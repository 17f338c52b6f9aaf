"""Where each source is (locate_sources) on the tiny random Qwen2.5-VL checkpoint: the grammar yields a valid
box per source on both decoding paths; a request without it gets the description it always got (same
prompt, same grammar, same bytes for the same seed, whatever was asked before); the pixel frame the
boxes are converted from is Qwen's own resize."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from i2s_formats import boxes
from vlm_prompt import load_prompt
from vlm_service.backend import DecodingOptions, DescriptionDone
from vlm_service.engine_options import EngineOptions
from vlm_service.transformers_backend import TransformersVisionBackend, render_chatml

MAX_NEW_TOKENS = 1024
SAMPLED = dict(max_new_tokens=MAX_NEW_TOKENS, temperature=0.7, top_p=0.9, seed=11)


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=["generate", "engine", "engine, prompt v2"])
def backend(request, tiny_vlm_dir):
    engine = None if request.param == "generate" else EngineOptions(
        max_batch=2, batch_buckets=(1, 2), token_buckets=(1, 4), length_buckets=(1024, 2048), prefix_cache=True)
    version = "v2" if "v2" in request.param else "v1"  # v2: the task text (and so the box line) before the image
    b = TransformersVisionBackend(str(tiny_vlm_dir), device="cpu", engine=engine, prompt_version=version)
    b.load()
    b.warmup()
    yield b
    b.close()


def _describe(backend, image, **options):
    (done,) = [e for e in backend.stream(image, DecodingOptions(**options)) if isinstance(e, DescriptionDone)]
    return done.description


def test_with_locate_sources_every_source_has_a_valid_box(backend):
    image = _image(3, (96, 40))
    description = _describe(backend, image, locate_sources=True, **SAMPLED)
    assert description.sources
    for source in description.sources:
        assert source.HasField("location"), source.name
        box = source.location
        assert boxes.box_error([box.x_min, box.y_min, box.x_max, box.y_max]) is None


def test_without_locate_sources_the_description_is_what_it_always_was(backend):
    image = _image(4, (64, 48))
    grammar, prompt_text = backend.grammar_and_prompt(False)
    assert prompt_text == render_chatml(load_prompt(backend.prompt_version)) and grammar is backend._grammar
    before = _describe(backend, image, **SAMPLED)
    located = _describe(backend, image, locate_sources=True, **SAMPLED)
    after = _describe(backend, image, **SAMPLED)
    assert before.SerializeToString() == after.SerializeToString()
    assert not any(s.HasField("location") for s in before.sources)
    assert all(s.HasField("location") for s in located.sources)
    assert backend.grammar_and_prompt(True)[1] != prompt_text


@pytest.mark.parametrize("size", [(64, 48), (48, 640), (1000, 37), (333, 333), (1920, 1080), (29, 2900)])
def test_the_pixel_frame_is_qwens_smart_resize_and_boxes_map_back_to_the_original(backend, size):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    processor = backend.image_processor  # the production loader's, with the service's pixel bounds
    width, height = size
    grid = processor(images=[_image(0, size)], return_tensors="pt")["image_grid_thw"][0].tolist()
    frame = boxes.PixelFrame.from_grid(grid, processor.patch_size)
    resized_h, resized_w = smart_resize(height, width, factor=processor.patch_size * processor.merge_size,
                                        min_pixels=processor.size["shortest_edge"],
                                        max_pixels=processor.size["longest_edge"])
    assert (frame.width, frame.height) == (resized_w, resized_h)
    # An object at original pixels (x0, y0, x1, y1), as the model sees it after the resize, comes back as
    # the same fraction of the original image (to within one resized pixel).
    original = (0.1 * width, 0.25 * height, 0.6 * width, 0.9 * height)
    seen = [round(original[0] * resized_w / width), round(original[1] * resized_h / height),
            round(original[2] * resized_w / width), round(original[3] * resized_h / height)]
    box = boxes.from_model_pixels(seen, frame)
    got = [box.x_min, box.y_min, box.x_max, box.y_max]
    want = [original[0] / width, original[1] / height, original[2] / width, original[3] / height]
    tolerance = [1 / resized_w, 1 / resized_h] * 2
    assert all(abs(g - w) <= t + 1e-4 for g, w, t in zip(got, want, tolerance))


@pytest.mark.parametrize("raw", [[50, 60, 10, 5], [0, 0, 0, 0], [99999, 5, 99999, 7], [3, 3, 3, 3]])
def test_any_box_the_grammar_allows_becomes_a_valid_normalised_box(raw):
    box = boxes.from_model_pixels(raw, boxes.PixelFrame(56, 28))
    assert boxes.box_error([box.x_min, box.y_min, box.x_max, box.y_max]) is None


@pytest.mark.parametrize("backend", ["engine"], indirect=True)  # generate() decodes one request at a time
def test_a_located_and_a_plain_request_decoded_together_each_keep_their_own_grammar(backend):
    """Rows of one engine step may carry different grammars: decoded side by side, each request gets what it
    gets alone (greedy)."""
    import threading

    assert backend.engine is not None
    image = _image(5, (80, 56))
    alone = {locate: _describe(backend, image, max_new_tokens=MAX_NEW_TOKENS, locate_sources=locate)
             for locate in (False, True)}
    together: dict[bool, object] = {}
    threads = [threading.Thread(target=lambda locate=locate: together.__setitem__(
        locate, _describe(backend, image, max_new_tokens=MAX_NEW_TOKENS, locate_sources=locate)))
        for locate in (False, True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert {k: v.SerializeToString() for k, v in together.items()} == \
        {k: v.SerializeToString() for k, v in alone.items()}
