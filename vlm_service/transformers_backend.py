"""In-process Qwen2.5-VL backend (Hugging Face transformers) with grammar-constrained decoding.

Loading is the real path for ``Qwen/Qwen2.5-VL-7B-Instruct`` (and 3B / AWQ variants, or a local
directory such as the tiny test checkpoint): ``AutoTokenizer`` + the Qwen2-VL image processor +
``Qwen2_5_VLForConditionalGeneration.from_pretrained(..., attn_implementation="sdpa")``.

No ``Qwen2_5_VLProcessor`` / ``AutoProcessor``: in transformers 5.x it requires a video processor, which
requires torchvision (not installable next to this CPU torch wheel; design.md section 4). The backend does
the processor's work for one image itself: chat template -> image processor -> expand the single
``<|image_pad|>`` to ``grid_t*grid_h*grid_w / merge_size**2`` copies -> tokenize -> ``mm_token_type_ids``
(1 on image tokens; transformers 5.x needs it to build Qwen2.5-VL's 3-D rope positions: without it,
``generate`` silently falls back to 1-D text positions for the image tokens).

Thread safety: one generation at a time. The model keeps per-generation state (``model.model.rope_deltas``),
so concurrent generations would corrupt each other; :meth:`stream` holds a lock for the whole
generation, so concurrent callers wait. Each stream runs ``generate`` in a worker thread and hands
tokens over through a queue; ``should_stop`` is called from that worker thread.
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import threading
import time
from typing import Any, Callable, Iterator

from PIL import Image

from vlm_prompt import PromptTemplate, load_prompt
from serving import seed_format
from vlm_service import rules
from vlm_service.backend import (
    BackendNotReady,
    BadImage,
    DecodingOptions,
    DescriptionDone,
    SceneHeader,
    SourceFound,
    StreamEvent,
    VisionBackend,
    validate,
)
from vlm_service.decoding import (
    GrammarLogitsProcessor,
    IncrementalDetokenizer,
    JsonStreamParser,
    ParsedHeader,
    ParsedSource,
    SeededSamplingLogitsProcessor,
    StopCriterion,
    build_tokenizer_info,
    compile_schema,
)

log = logging.getLogger(__name__)

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
PATCH_FACTOR = 28  # patch 14 x spatial merge 2: one visual token per 28 x 28 pixels
DEFAULT_MIN_PIXELS = 4 * 28 * 28  # the Qwen processor's own minimum (3136)
# At most 512 visual tokens. The hub default (12845056 px) keeps a 1024x768 photo at ~1000 tokens; 512*28*28
# gives 494 tokens for it (532x728 px), half the prefill and ViT work, and still plenty to name sound sources
# (we need objects and materials, not small text).
DEFAULT_MAX_PIXELS = 512 * 28 * 28
DEFAULT_REPETITION_PENALTY = 1.05  # Qwen2.5-VL's published generation default
MAX_ASPECT_RATIO = 200  # smart_resize refuses more
IMAGE_TOKEN = "<|image_pad|>"
_CHATML_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
_WARMUP_IMAGE_SIZE = (56, 56)


def visual_token_count(width: int, height: int, min_pixels: int = DEFAULT_MIN_PIXELS,
                       max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """Visual tokens Qwen2.5-VL spends on a width x height image: smart_resize, then one per 28 x 28."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    h, w = smart_resize(height, width, factor=PATCH_FACTOR, min_pixels=min_pixels, max_pixels=max_pixels)
    return (h // PATCH_FACTOR) * (w // PATCH_FACTOR)


def render_chatml(prompt: PromptTemplate) -> str:
    """Qwen's ChatML for the prompt, for tokenizers that come without a chat template."""
    return (
        f"<|im_start|>system\n{prompt.system}<|im_end|>\n"
        f"<|im_start|>user\n{_CHATML_IMAGE}{prompt.user_text}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def _load_image_processor(model: str, revision: str | None, token: str | None, **kwargs: Any):
    """The Qwen2-VL image processor of the checkpoint: the torchvision class when torchvision works,
    else the PIL class (AutoImageProcessor itself refuses to load without torchvision in transformers 5.x)."""
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        try:
            from transformers import AutoImageProcessor

            return AutoImageProcessor.from_pretrained(model, revision=revision, token=token, **kwargs)
        except (ImportError, RuntimeError) as exc:  # e.g. "torchvision::nms does not exist"
            log.warning("torchvision image processor unavailable (%s); using the PIL one", exc)
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil.from_pretrained(model, revision=revision, token=token, **kwargs)


def _resolve_dtype(dtype: Any, device: str):
    import torch

    if dtype is None:
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if isinstance(dtype, str):
        if dtype == "auto":
            return "auto"
        try:
            return {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
                    "fp16": torch.float16, "half": torch.float16, "float32": torch.float32,
                    "fp32": torch.float32}[dtype.lower()]
        except KeyError:
            raise ValueError(f"unknown dtype {dtype!r}") from None
    return dtype


class TransformersVisionBackend(VisionBackend):
    """Qwen2.5-VL in this process, decoding JSON constrained by the prompt version's schema (xgrammar).

    Args:
        model: hub id or local directory.
        revision, token: passed to ``from_pretrained``; ``token`` falls back to the environment variables
            HUGGING_FACE_TOKEN, then HF_TOKEN.
        device: "cuda", "cuda:1", "cpu"...; default cuda when available.
        dtype: torch dtype or name; default bfloat16 on GPU, float32 on CPU ("auto": the checkpoint's).
        min_pixels, max_pixels: image resize bounds (None: the checkpoint's preprocessor config).
        prompt_version: folder of ``vlm_prompt`` to use.
        repetition_penalty: applied in greedy and sampled decoding (1.0 disables it).
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        revision: str | None = None,
        token: str | None = None,
        device: str | None = None,
        dtype: Any = None,
        min_pixels: int | None = DEFAULT_MIN_PIXELS,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        prompt_version: str = "v1",
        repetition_penalty: float = DEFAULT_REPETITION_PENALTY,
        attn_implementation: str = "sdpa",
    ) -> None:
        for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
            if value is not None and (not isinstance(value, int) or value < PATCH_FACTOR * PATCH_FACTOR):
                raise ValueError(f"{name} must be an integer >= {PATCH_FACTOR * PATCH_FACTOR}, got {value!r}")
        if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
            raise ValueError(f"min_pixels ({min_pixels}) > max_pixels ({max_pixels})")
        if not repetition_penalty > 0:
            raise ValueError("repetition_penalty must be > 0")
        self.model_id = str(model)
        self.prompt_version = prompt_version
        self._revision = revision
        self._token = token
        self._device_arg = device
        self._dtype_arg = dtype
        self._min_pixels = min_pixels
        self._max_pixels = max_pixels
        self._repetition_penalty = float(repetition_penalty)
        self._attn_implementation = attn_implementation
        self._lock = threading.Lock()
        self._loaded = False
        self._warm = False
        self._closed = False
        self.prompt: PromptTemplate | None = None
        self.device: str | None = None
        self.tokenizer = None
        self.image_processor = None
        self.model = None
        self._grammar = None
        self._vocab_size = 0
        self._stop_ids: list[int] = []
        self._pad_id = 0
        self._image_token_id = 0
        self._merge_size = 2
        self.prompt_text = ""

    # -- life cycle --------------------------------------------------------------------------------

    def load(self) -> None:
        with self._lock:
            if self._closed:
                raise BackendNotReady("backend is closed")
            if self._loaded:
                return
            self._load_locked()

    def _load_locked(self) -> None:
        import torch
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        started = time.perf_counter()
        self.prompt = load_prompt(self.prompt_version)
        token = self._token or os.environ.get("HUGGING_FACE_TOKEN") or os.environ.get("HF_TOKEN") or None
        device = self._device_arg or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = _resolve_dtype(self._dtype_arg, device)
        common = {"revision": self._revision, "token": token}

        tokenizer = AutoTokenizer.from_pretrained(self.model_id, **common)
        pixel_kwargs = {}
        if self._min_pixels is not None:
            pixel_kwargs["min_pixels"] = self._min_pixels
        if self._max_pixels is not None:
            pixel_kwargs["max_pixels"] = self._max_pixels
        image_processor = _load_image_processor(self.model_id, self._revision, token, **pixel_kwargs)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            self.model_id, dtype=dtype, attn_implementation=self._attn_implementation, device_map=device, **common
        )
        model.eval()

        image_token_id = int(model.config.image_token_id)
        if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != image_token_id:
            raise RuntimeError(f"tokenizer's {IMAGE_TOKEN} id differs from the model's image_token_id {image_token_id}")
        vocab_size = int(model.get_output_embeddings().weight.shape[0])
        stop_ids: list[int] = []
        candidates = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
        gen_eos = model.generation_config.eos_token_id
        candidates.extend(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        for tid in candidates:
            if isinstance(tid, int) and 0 <= tid < vocab_size and tid not in stop_ids:
                stop_ids.append(tid)
        if not stop_ids:
            raise RuntimeError("no stop token found (expected <|im_end|>)")
        pad_id = tokenizer.pad_token_id
        if pad_id is None:
            pad_id = model.generation_config.pad_token_id
        if pad_id is None:
            pad_id = stop_ids[0]

        tokenizer_info = build_tokenizer_info(tokenizer, vocab_size, stop_ids)
        grammar = compile_schema(tokenizer_info, self.prompt.schema)

        if tokenizer.chat_template:
            prompt_text = tokenizer.apply_chat_template(
                self.prompt.messages(), tokenize=False, add_generation_prompt=True
            )
        else:
            prompt_text = render_chatml(self.prompt)
        if prompt_text.count(IMAGE_TOKEN) != 1:
            raise RuntimeError(f"chat template produced {prompt_text.count(IMAGE_TOKEN)} image placeholders, expected 1")

        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.model = model
        self.device = device
        self._grammar = grammar
        self._vocab_size = vocab_size
        self._stop_ids = stop_ids
        self._pad_id = int(pad_id)
        self._image_token_id = image_token_id
        self._merge_size = int(getattr(image_processor, "merge_size", 2) or 2)
        self.prompt_text = prompt_text
        self._loaded = True
        log.info("loaded %s on %s (%s) in %.1f s", self.model_id, device, dtype, time.perf_counter() - started)

    @property
    def ready(self) -> bool:
        return self._loaded and self._warm and not self._closed

    def warmup(self) -> None:
        """One short constrained generation on a small grey image (8 tokens)."""
        self._require_loaded()
        image = Image.new("RGB", _WARMUP_IMAGE_SIZE, (128, 128, 128))
        options = DecodingOptions(max_new_tokens=8)
        for _ in self._stream(self.prepare_inputs(image), options, None, time.perf_counter(), quiet=True):
            pass
        self._warm = True

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._loaded = False
            cuda = bool(self.device and self.device.startswith("cuda"))
            self.model = self.tokenizer = self.image_processor = self._grammar = None
            if cuda:
                import torch

                torch.cuda.empty_cache()

    # -- inputs ------------------------------------------------------------------------------------

    def count_prompt_tokens(self, width: int, height: int) -> int:
        """Prompt tokens (text + image) for an image of this size, without running anything."""
        self._require_loaded()
        text_tokens = len(self.tokenizer(self.prompt_text, add_special_tokens=False)["input_ids"])
        size = self.image_processor.size
        min_pixels = getattr(size, "shortest_edge", None) or DEFAULT_MIN_PIXELS
        max_pixels = getattr(size, "longest_edge", None) or DEFAULT_MAX_PIXELS
        return text_tokens - 1 + visual_token_count(width, height, min_pixels, max_pixels)

    def prepare_inputs(self, image: Image.Image) -> dict[str, Any]:
        """Model inputs for one image: input_ids, attention_mask, pixel_values, image_grid_thw,
        mm_token_type_ids (all on the model's device). Raises BadImage."""
        import torch

        self._require_loaded()
        if not isinstance(image, Image.Image):
            raise BadImage("expected a PIL image")
        width, height = image.size
        if width < 1 or height < 1:
            raise BadImage(f"empty image ({width}x{height})")
        if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
            raise BadImage(f"aspect ratio above {MAX_ASPECT_RATIO}: {width}x{height}")
        if image.mode != "RGB":
            image = image.convert("RGB")
        try:
            vision = self.image_processor(images=[image], return_tensors="pt")
        except ValueError as exc:
            raise BadImage(f"image cannot be processed: {exc}") from exc
        grid = vision["image_grid_thw"]
        n_image_tokens = int(grid[0].prod().item()) // (self._merge_size**2)
        text = self.prompt_text.replace(IMAGE_TOKEN, IMAGE_TOKEN * n_image_tokens, 1)
        encoded = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        input_ids = encoded["input_ids"]
        is_image = input_ids == self._image_token_id
        if int(is_image.sum().item()) != n_image_tokens:
            raise RuntimeError("image token expansion does not match the image grid")
        device = self.model.device
        return {
            "input_ids": input_ids.to(device),
            "attention_mask": encoded["attention_mask"].to(device),
            "pixel_values": vision["pixel_values"].to(device=device, dtype=self.model.dtype),
            "image_grid_thw": grid.to(device),
            # 0 = text, 1 = image, 2 = video (what Qwen2_5_VLProcessor returns with return_mm_token_type_ids)
            "mm_token_type_ids": is_image.to(torch.long).to(device),
        }

    def _require_loaded(self) -> None:
        if self._closed:
            raise BackendNotReady("backend is closed")
        if not self._loaded:
            raise BackendNotReady("backend is not loaded")

    # -- generation --------------------------------------------------------------------------------

    def _generation_config(self, options: DecodingOptions):
        from transformers import GenerationConfig

        # Everything explicit: the hub checkpoint's generation_config.json says do_sample=True, top_k=1,
        # top_p=0.001, temperature=0.1, which generate() would otherwise merge in. Sampling, when asked
        # for, is done by SeededSamplingLogitsProcessor, so generate() itself always picks the argmax.
        return GenerationConfig(
            max_new_tokens=options.max_new_tokens,
            do_sample=False,
            num_beams=1,
            temperature=1.0,
            top_p=1.0,
            top_k=50,  # the library default: no "ignored flag" warning under greedy
            repetition_penalty=self._repetition_penalty,
            eos_token_id=list(self._stop_ids),
            pad_token_id=self._pad_id,
            use_cache=True,
        )

    def stream(
        self,
        image: Image.Image,
        options: DecodingOptions,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[StreamEvent]:
        # Checks run now, in the caller's thread, not at the first next(): bad options, not loaded, bad image.
        started = time.perf_counter()
        validate(options)
        self._require_loaded()
        inputs = self.prepare_inputs(image)
        return self._stream(inputs, options, should_stop, started, quiet=False)

    def _stream(
        self,
        inputs: dict[str, Any],
        options: DecodingOptions,
        should_stop: Callable[[], bool] | None,
        started: float,
        quiet: bool,
    ) -> Iterator[StreamEvent]:
        with self._lock:
            self._require_loaded()
            yield from self._stream_locked(inputs, options, should_stop, started, quiet)

    def _stream_locked(
        self,
        inputs: dict[str, Any],
        options: DecodingOptions,
        should_stop: Callable[[], bool] | None,
        started: float,
        quiet: bool,
    ) -> Iterator[StreamEvent]:
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        prompt_tokens = int(inputs["input_ids"].shape[1])

        processors: list[Any] = [GrammarLogitsProcessor(self._grammar, self._vocab_size)]
        if options.temperature > 0:
            seed = options.seed if options.seed is not None else secrets.randbits(63)
            processors.append(SeededSamplingLogitsProcessor(options.temperature, options.top_p, seed))
        abandoned = threading.Event()
        stop = StopCriterion(should_stop, abandoned.is_set)
        tokens: queue.SimpleQueue = queue.SimpleQueue()

        class _QueueStreamer(BaseStreamer):
            def __init__(self) -> None:
                self.prompt_seen = False

            def put(self, value) -> None:
                if not self.prompt_seen:  # generate() first pushes the prompt
                    self.prompt_seen = True
                    return
                for token_id in value.reshape(-1).tolist():
                    tokens.put(("token", int(token_id)))

            def end(self) -> None:
                pass

        def run() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(
                        **inputs,
                        generation_config=self._generation_config(options),
                        logits_processor=LogitsProcessorList(processors),
                        stopping_criteria=StoppingCriteriaList([stop]),
                        streamer=_QueueStreamer(),
                    )
                tokens.put(("end", None))
            except BaseException as exc:  # handed to the consumer
                tokens.put(("error", exc))

        if should_stop is not None and should_stop():
            worker = None
            tokens.put(("end", None))
            stop.triggered.set()
        else:
            worker = threading.Thread(target=run, name="vlm-generate", daemon=True)
            worker.start()

        detok = IncrementalDetokenizer(lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True))
        parser = JsonStreamParser()
        post = rules.PostRules()
        output_tokens = 0
        first_token_at: float | None = None

        def handle(events) -> Iterator[StreamEvent]:
            for event in events:
                if isinstance(event, ParsedHeader):
                    yield SceneHeader(
                        scene=seed_format.clean_text(event.scene, seed_format.MAX_SCENE_CHARS),
                        mood=seed_format.clean_text(event.mood, seed_format.MAX_MOOD_CHARS),
                    )
                elif isinstance(event, ParsedSource):
                    source = seed_format.source_from_raw(event.data, event.index)
                    admitted = post.add(source) if source is not None else None
                    if admitted is not None:
                        yield SourceFound(admitted)

        try:
            while True:
                kind, value = tokens.get()
                if kind == "token":
                    output_tokens += 1
                    if first_token_at is None:
                        first_token_at = time.perf_counter()
                    piece = detok.push(value)
                    if piece:
                        yield from handle(parser.feed(piece))
                elif kind == "end":
                    break
                else:
                    raise value
        finally:
            abandoned.set()
            if worker is not None:
                worker.join()

        tail = detok.flush()
        if tail:
            yield from handle(parser.feed(tail))
        yield from handle(parser.close())
        for extra in post.finish():
            yield SourceFound(extra)

        if parser.complete:
            finish_reason = "stop"
        elif stop.triggered.is_set():
            finish_reason = "cancelled"
        else:
            finish_reason = "length"
            if not quiet:
                log.warning("generation hit max_new_tokens=%d before the JSON was complete",
                            options.max_new_tokens)
        # The parser's final values: equal to the header's, unless sources came before scene/mood (only
        # possible without the grammar), which forces an early header with what was known then.
        description = post.description(
            seed_format.clean_text(parser.scene or "", seed_format.MAX_SCENE_CHARS),
            seed_format.clean_text(parser.mood or "", seed_format.MAX_MOOD_CHARS),
        )
        description.prompt_version = self.prompt_version
        description.model_id = self.model_id
        finished = time.perf_counter()
        yield DescriptionDone(
            description=description,
            prompt_tokens=prompt_tokens,
            output_tokens=output_tokens,
            time_to_first_token_seconds=(first_token_at or finished) - started,
            total_seconds=finished - started,
            finish_reason=finish_reason,
        )
