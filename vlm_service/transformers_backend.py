"""In-process Qwen2.5-VL backend (Hugging Face transformers) with grammar-constrained decoding.

Loading is the real path for ``Qwen/Qwen2.5-VL-7B-Instruct`` (and 3B / AWQ variants, or a local
directory such as the tiny test checkpoint): ``AutoTokenizer`` + the Qwen2-VL image processor +
``Qwen2_5_VLForConditionalGeneration.from_pretrained(..., attn_implementation="sdpa")``.

No ``Qwen2_5_VLProcessor`` / ``AutoProcessor``: in transformers 5.x it requires a video processor, which
requires torchvision (not installable next to this CPU torch wheel; docs/architecture.md "Models and testing
without their weights"). The backend does the processor's work for one image itself: chat template -> image
processor -> expand the single
``<|image_pad|>`` to ``grid_t*grid_h*grid_w / merge_size**2`` copies -> tokenize -> ``mm_token_type_ids``
(1 on image tokens; transformers 5.x needs it to build Qwen2.5-VL's 3-D rope positions: without it,
``generate`` silently falls back to 1-D text positions for the image tokens).

Threads: every model call (load, warm-up, every generation) runs on the backend's one model thread (a
:class:`~serving.blocking.ModelWorker`; the first ``generate`` on a new thread runs ~3x slower for the whole
call: docs/architecture.md "One model thread"). Callers submit requests from any thread; images are checked and turned into
CPU tensors in the caller's thread; the model thread hands back token ids, which the caller's side turns
into events (:mod:`vlm_service.assembly`). Requests wait in a bounded queue (``Overloaded`` when full) of the
:class:`~vlm_service.scheduler.Scheduler`, which runs the decode loop on the model thread; this module keeps
loading, input preparation and the reference ``generate()`` path.

Two decoding paths, chosen by ``engine``:
- ``None``: the reference, ``model.generate()`` per request, one request at a time;
- :class:`~vlm_service.engine_options.EngineOptions`: the decode engine (static per-row KV cache, captured decode
  step, grammar jump-forward, concurrent requests decoded together, prefix cache), each part switchable.
Greedy decoding gives the same tokens on both (tests/integration/test_vlm_engine.py).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import secrets
import threading
import time
from typing import Any, AsyncIterator, Callable, Iterator

from PIL import Image

from i2s_formats.boxes import PixelFrame
from serving import metrics
from serving.blocking import ModelWorker
from serving.deadline import Deadline
from serving.errors import InvalidInput, NotReady
from serving.priority import INTERACTIVE, PriorityOrder
from serving.pump import Pump
from serving.models import DEFAULT_VLM_MODEL, checkpoint_revision, hf_token, torch_dtype
from vlm_prompt import PromptTemplate, load_prompt
from vlm_service.assembly import DescriptionAssembler
from vlm_service.backend import DecodingOptions, StreamEvent, VisionBackend
from vlm_service.config import VlmConfig, engine_options
from vlm_service.grammar import GrammarLogitsProcessor, build_tokenizer_info, compile_schema
from vlm_service.stop_criterion import StopCriterion
from vlm_service.engine_options import EngineOptions
from vlm_service.engine_request import EngineRequest
from vlm_service.sampling import SeededSamplingLogitsProcessor
from vlm_service.messages import Delivery, Failed, Finished, Tokens
from vlm_service.scheduler import Scheduler

log = logging.getLogger(__name__)

PATCH_FACTOR = 28  # patch 14 x spatial merge 2: one visual token per 28 x 28 pixels
DEFAULT_MIN_PIXELS = 4 * 28 * 28  # the Qwen processor's own minimum (3136)
# At most 512 visual tokens. The hub default (12845056 px) keeps a 1024x768 photo at ~1000 tokens; 512*28*28
# gives 494 tokens for it (532x728 px), half the prefill and ViT work, and still plenty to name sound sources
# (we need objects and materials, not small text).
DEFAULT_MAX_PIXELS = 512 * 28 * 28
DEFAULT_REPETITION_PENALTY = 1.05  # Qwen2.5-VL's published generation default
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
    user = _CHATML_IMAGE + prompt.user_text if prompt.image_first else prompt.user_text + _CHATML_IMAGE
    return (
        f"<|im_start|>system\n{prompt.system}<|im_end|>\n"
        f"<|im_start|>user\n{user}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def random_model(path: str, dtype: Any, device: str, attn_implementation: str):
    """Qwen2.5-VL of the config in ``path`` with random weights, built without touching the host's memory or
    the disk (a full-size model for a GPU benchmark in seconds instead of writing and reading 16 GB): the
    modules are constructed on the meta device, given storage on ``device``, then initialised there
    (transformers' ``init_weights``: the usual random init, and the rotary buffers computed again)."""
    import torch
    from transformers import AutoConfig, GenerationConfig, Qwen2_5_VLForConditionalGeneration

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype,
                                                                 attn_implementation=attn_implementation)
    model.to_empty(device=device)
    torch.manual_seed(0)
    with torch.no_grad():
        model.init_weights()
    try:
        model.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json: the model's defaults
        pass
    return model


def _prompt_text(tokenizer: Any, prompt: PromptTemplate) -> str:
    """The chat-templated prompt (ChatML when the tokenizer has no template), with its one image placeholder."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(prompt.messages(), tokenize=False, add_generation_prompt=True)
    else:
        text = render_chatml(prompt)
    if text.count(IMAGE_TOKEN) != 1:
        raise RuntimeError(f"chat template produced {text.count(IMAGE_TOKEN)} image placeholders, expected 1")
    return text


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
        engine: the decode engine's options; None decodes with ``generate()``, one request at a time.
        max_queue: requests waiting for the model (not yet decoding) before ``Overloaded``.
        sdpa_backend: the SDPA kernels allowed on CUDA (:func:`vlm_service.attention.choose_sdpa_backends`).
        random_weights: benchmarks only: the architecture of ``model``'s config.json with random weights made
            on the device (:func:`random_model`); its weight files, if any, are not read.
    """

    def __init__(
        self,
        model: str = DEFAULT_VLM_MODEL,
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
        sdpa_backend: str = "flash-efficient",
        random_weights: bool = False,
        engine: EngineOptions | None = None,
        max_queue: int = 16,
        batch_aging: int = 4,
        interactive_rows: int = 1,
    ) -> None:
        for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
            if value is not None and (not isinstance(value, int) or value < PATCH_FACTOR * PATCH_FACTOR):
                raise ValueError(f"{name} must be an integer >= {PATCH_FACTOR * PATCH_FACTOR}, got {value!r}")
        if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
            raise ValueError(f"min_pixels ({min_pixels}) > max_pixels ({max_pixels})")
        if not repetition_penalty > 0:
            raise ValueError("repetition_penalty must be > 0")
        if max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        self.model_id = str(model)
        self.prompt_version = prompt_version
        self.engine_options = engine
        self._revision = revision
        self._token = token
        self._device_arg = device
        self._dtype_arg = dtype
        self._min_pixels = min_pixels
        self._max_pixels = max_pixels
        self._repetition_penalty = float(repetition_penalty)
        self._attn_implementation = attn_implementation
        self._sdpa_backend = sdpa_backend
        self._random_weights = random_weights
        self._max_queue = max_queue
        self._batch_aging = batch_aging  # the scheduler's priority aging (serving.priority)
        self._interactive_rows = interactive_rows  # decode rows batch work leaves free
        for state in ("queued", "running"):  # both series exist from the start (at 0)
            metrics.WORK_CANCELLED.labels(stage="vlm", state=state)
        # The model thread; the scheduler (made at load) queues requests for it and runs the decode loop there.
        self.worker = ModelWorker("vlm-model")
        self.scheduler: Scheduler | None = None
        self._loaded = False
        self._warm = False
        self._closed = False
        self.prompt: PromptTemplate | None = None
        self.device: str | None = None
        self.tokenizer = None
        self.image_processor = None
        self.model = None
        self.engine = None
        self._grammar = None
        self._tokenizer_info = None
        self._located: tuple[Any, str] | None = None  # (grammar, prompt text) with boxes, made when first asked
        self._located_lock = threading.Lock()
        self._vocab_size = 0
        self._stop_ids: list[int] = []
        self._pad_id = 0
        self._image_token_id = 0
        self._merge_size = 2
        self._patch_size = 14
        self.prompt_text = ""

    @classmethod
    def from_config(cls, config: VlmConfig) -> "TransformersVisionBackend":
        """The backend the VLM service's settings describe (the service and the Triton model build it so)."""
        kwargs = dict(revision=config.revision, token=hf_token(), device=config.device, dtype=config.dtype,
                      prompt_version=config.prompt_version, max_queue=config.max_queue, engine=engine_options(config),
                      batch_aging=config.priority.batch_aging, interactive_rows=config.engine_interactive_rows,
                      sdpa_backend=config.sdpa_backend, random_weights=config.random_weights)
        if config.max_pixels:
            kwargs["max_pixels"] = config.max_pixels
        return cls(config.model, **kwargs)

    # -- life cycle (each step a job on the model thread) -----------------------------------------

    def _on_model_thread(self, fn: Callable, *args) -> Any:
        return self.worker.submit(fn, *args).result()

    def load(self) -> None:
        if self._closed:
            raise NotReady("backend is closed")
        self._on_model_thread(self._load_on_thread)

    def _load_on_thread(self) -> None:
        import torch
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        if self._closed:
            raise NotReady("backend is closed")
        if self._loaded:
            return
        started = time.perf_counter()
        self.prompt = load_prompt(self.prompt_version)
        token = hf_token(self._token)
        device = self._device_arg or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch_dtype(self._dtype_arg, device, gpu_default="bfloat16")
        if device.startswith("cuda"):
            from vlm_service.attention import choose_sdpa_backends

            choose_sdpa_backends(self._sdpa_backend)
        common = {"revision": self._revision, "token": token}

        tokenizer = AutoTokenizer.from_pretrained(self.model_id, **common)
        pixel_kwargs = {}
        if self._min_pixels is not None:
            pixel_kwargs["min_pixels"] = self._min_pixels
        if self._max_pixels is not None:
            pixel_kwargs["max_pixels"] = self._max_pixels
        image_processor = _load_image_processor(self.model_id, self._revision, token, **pixel_kwargs)
        if self._random_weights:
            model = random_model(self.model_id, dtype, device, self._attn_implementation)
        else:
            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                self.model_id, dtype=dtype, attn_implementation=self._attn_implementation, device_map=device,
                **common)
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

        prompt_text = _prompt_text(tokenizer, self.prompt)

        self.tokenizer = tokenizer
        self._tokenizer_info = tokenizer_info
        self.image_processor = image_processor
        self.model = model
        self.device = device
        self._grammar = grammar
        self._vocab_size = vocab_size
        self._stop_ids = stop_ids
        self._pad_id = int(pad_id)
        self._image_token_id = image_token_id
        self._merge_size = int(getattr(image_processor, "merge_size", 2) or 2)
        self._patch_size = int(getattr(image_processor, "patch_size", 14) or 14)
        self.prompt_text = prompt_text
        if self.engine_options is not None:
            from vlm_service.engine import DecodeEngine

            ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
            self.engine = DecodeEngine(
                model, tokenizer, grammar, vocab_size=vocab_size, stop_ids=stop_ids, pad_id=self._pad_id,
                repetition_penalty=self._repetition_penalty, prefix_ids=ids[: ids.index(image_token_id)],
                options=self.engine_options)
        self.scheduler = Scheduler(self.worker, max_queue=self._max_queue, engine=self.engine,
                                   reference=self.generate_reference,
                                   order=PriorityOrder(self._batch_aging, reserved=self._interactive_rows))
        self.model_revision = checkpoint_revision(self.model_id, self._revision, token)
        self._loaded = True
        log.info("loaded %s on %s (%s) in %.1f s", self.model_id, device, dtype, time.perf_counter() - started)

    def result_identity(self) -> dict | None:
        identity = super().result_identity()
        if identity is None:
            return None
        # The image's pixel budget, the precision, the device kind and the decode path change the tokens.
        return {**identity, "dtype": str(self.model.dtype), "device": str(self.device).split(":")[0],
                "pixels": [self._min_pixels, self._max_pixels], "repetition_penalty": self._repetition_penalty,
                "engine": self.engine is not None}

    @property
    def ready(self) -> bool:
        return self._loaded and self._warm and not self._closed

    def warmup(self) -> None:
        """Warm the model on the shapes requests use, on the model thread, before the service says SERVING:
        the engine runs (and captures, when asked) its decode step at every bucket shape and computes the
        prefix cache; then one short constrained description of a small grey image goes through the path
        requests take (prefill with an image, grammar, sampling loop)."""
        self._require_loaded()
        started = time.perf_counter()
        if self.engine is not None:
            self._on_model_thread(self.engine.warm)
            self.serving_path, self.serving_path_reason = self.engine.runner.path, self.engine.path_reason
        else:
            self.serving_path = "generate"
        image = Image.new("RGB", _WARMUP_IMAGE_SIZE, (128, 128, 128))
        for _ in self.stream(image, DecodingOptions(max_new_tokens=8), quiet=True):
            pass
        self.grammar_and_prompt(locate_sources=True)  # compiled now, not on the first request's event loop
        self._warm = True
        log.info("warm in %.1f s", time.perf_counter() - started)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.scheduler is not None:
            self.scheduler.close()
        try:
            self._on_model_thread(self._release_on_thread)
        finally:
            self.worker.close()

    def _release_on_thread(self) -> None:
        self._loaded = False
        cuda = bool(self.device and self.device.startswith("cuda"))
        if self.engine is not None:
            self.engine.close()
        self.engine = self.model = self.tokenizer = self.image_processor = self._grammar = None
        self._located = self._tokenizer_info = None
        if cuda:
            import torch

            torch.cuda.empty_cache()

    # -- inputs (caller's thread, CPU only) ---------------------------------------------------------

    def grammar_and_prompt(self, locate_sources: bool = False) -> tuple[Any, str]:
        """The grammar and prompt text of a request: the version's own, or with boxes (compiled once, at
        warm-up)."""
        if not locate_sources:
            return self._grammar, self.prompt_text
        with self._located_lock:
            if self._located is None:
                located = self.prompt.located()
                self._located = (compile_schema(self._tokenizer_info, located.schema),
                                 _prompt_text(self.tokenizer, located))
            return self._located

    def prepare_inputs(self, image: Image.Image, prompt_text: str | None = None) -> dict[str, Any]:
        """Model inputs for one image, as CPU tensors: input_ids, attention_mask, pixel_values,
        image_grid_thw, mm_token_type_ids (the model thread moves them to the device); ``prompt_text``
        defaults to the version's. Raises InvalidInput."""
        import torch

        self._require_loaded()
        if not isinstance(image, Image.Image):
            raise InvalidInput("expected a PIL image")
        width, height = image.size
        if width < 1 or height < 1:
            raise InvalidInput(f"empty image ({width}x{height})")
        if image.mode != "RGB":
            image = image.convert("RGB")
        try:
            vision = self.image_processor(images=[image], return_tensors="pt")
        except ValueError as exc:
            raise InvalidInput(f"image cannot be processed: {exc}") from exc
        grid = vision["image_grid_thw"]
        n_image_tokens = int(grid[0].prod().item()) // (self._merge_size**2)
        text = (prompt_text or self.prompt_text).replace(IMAGE_TOKEN, IMAGE_TOKEN * n_image_tokens, 1)
        encoded = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        input_ids = encoded["input_ids"]
        is_image = input_ids == self._image_token_id
        if int(is_image.sum().item()) != n_image_tokens:
            raise RuntimeError("image token expansion does not match the image grid")
        return {
            "input_ids": input_ids,
            "attention_mask": encoded["attention_mask"],
            "pixel_values": vision["pixel_values"],
            "image_grid_thw": grid,
            # 0 = text, 1 = image, 2 = video (what Qwen2_5_VLProcessor returns with return_mm_token_type_ids)
            "mm_token_type_ids": is_image.to(torch.long),
        }

    def _require_loaded(self) -> None:
        if self._closed:
            raise NotReady("backend is closed")
        if not self._loaded:
            raise NotReady("backend is not loaded")

    # -- requests ----------------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Requests accepted and waiting for the model (the i2s_queue_depth gauge)."""
        return self.scheduler.queue_depth if self.scheduler is not None else 0

    def submit(self, image: Image.Image, options: DecodingOptions, deliver: Callable[[Delivery], None], *,
               should_stop: Callable[[], bool] | None = None, deadline: float | None = None,
               priority: str = INTERACTIVE) -> tuple[EngineRequest, DescriptionAssembler]:
        """Queue one request; ``deliver`` gets its token ids and its end on the model thread (see
        :class:`~vlm_service.engine_request.EngineRequest`). Raises InvalidInput,
        NotReady, Overloaded, before anything is queued."""
        started = time.perf_counter()
        self._require_loaded()
        grammar, prompt_text = self.grammar_and_prompt(options.locate_sources)
        inputs = self.prepare_inputs(image, prompt_text)
        req = EngineRequest(inputs=inputs, max_new_tokens=options.max_new_tokens, temperature=options.temperature,
                            top_p=options.top_p, seed=options.seed, deliver=deliver, should_stop=should_stop,
                            deadline=deadline, grammar=grammar, priority=priority)
        frame = PixelFrame.from_grid(inputs["image_grid_thw"][0].tolist(), self._patch_size) \
            if options.locate_sources else None  # the model's boxes are in pixels of this resized frame
        assembler = DescriptionAssembler(
            self.tokenizer, prompt_version=self.prompt_version, model_id=self.model_id,
            prompt_tokens=int(inputs["input_ids"].shape[1]), started=started, max_new_tokens=options.max_new_tokens,
            frame=frame)
        self.scheduler.submit(req)
        return req, assembler

    def stream(
        self,
        image: Image.Image,
        options: DecodingOptions,
        should_stop: Callable[[], bool] | None = None,
        *,
        deadline: float | None = None,
        priority: str = INTERACTIVE,
        quiet: bool = False,
    ) -> Iterator[StreamEvent]:
        # Checks run now, in the caller's thread, not at the first next(): bad options, not loaded, bad image.
        items: queue.SimpleQueue = queue.SimpleQueue()
        req, assembler = self.submit(image, options, items.put, should_stop=should_stop, deadline=deadline,
                                     priority=priority)
        assembler.quiet = quiet
        return self._events(req, assembler, items)

    @staticmethod
    def _events(req: EngineRequest, assembler: DescriptionAssembler, items: queue.SimpleQueue) -> Iterator[StreamEvent]:
        """The blocking twin of :meth:`astream`'s loop, for callers on a thread (no event loop to pump to)."""
        try:
            while True:
                events, finished = _assemble(assembler, items.get())
                yield from events
                if finished:
                    return
        finally:
            req.cancelled.set()  # a consumer that leaves early stops its decoding at the next step

    concurrent_requests = None  # it schedules them: its scheduler's queue (max_queue) is the one in front of the model

    async def astream(self, image: Image.Image, options: DecodingOptions, worker: Any = None,
                      deadline: Deadline | None = None, priority: str = INTERACTIVE) -> AsyncIterator[StreamEvent]:
        """Events for asyncio callers, decoded concurrently with other requests; ``worker`` is unused (the
        backend has its own model thread). Leaving early cancels the request."""
        gone = threading.Event()
        async with Pump() as pump:

            def deliver(item: Delivery) -> None:  # on the model thread
                if not pump.put_threadsafe(item):  # the event loop is gone: nobody listens any more
                    gone.set()

            req, assembler = self.submit(image, options, deliver, should_stop=gone.is_set,
                                         deadline=deadline.at if deadline is not None else None,  # the engine's instant
                                         priority=priority)
            started = False
            try:
                async for item in pump:  # ends at the request's Finished (or Failed: raised)
                    started = True
                    events, finished = _assemble(assembler, item)
                    for event in events:
                        yield event
                    if finished:
                        return
            except (asyncio.CancelledError, GeneratorExit):  # the caller left: its row (or queue place) is freed
                metrics.WORK_CANCELLED.labels(stage="vlm", state="running" if started else "queued").inc()
                raise
            finally:
                req.cancelled.set()

    # -- the reference path (model thread) ----------------------------------------------------------

    def _generation_config(self, options: EngineRequest):
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

    def generate_reference(self, req: EngineRequest) -> None:
        """The reference path: ``model.generate()`` with the grammar as a logits processor (batch 1), on the
        calling thread, which must be the model thread (the scheduler's loop without an engine; the bench, in a
        job of :attr:`worker`). A request that left while queued never gets here: the scheduler ends it."""
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        grammar = req.grammar if req.grammar is not None else self._grammar
        processors: list[Any] = [GrammarLogitsProcessor(grammar, self._vocab_size)]
        if req.temperature > 0:
            seed = req.seed if req.seed is not None else secrets.randbits(63)
            processors.append(SeededSamplingLogitsProcessor(req.temperature, req.top_p, seed))
        stopped: list[str] = []

        def check() -> bool:
            why = req.stop_reason()
            if why is not None and not stopped:
                stopped.append(why)
            return why is not None

        counted = [0]

        class _Streamer(BaseStreamer):
            prompt_seen = False

            def put(self, value) -> None:
                if not self.prompt_seen:  # generate() first pushes the prompt
                    self.prompt_seen = True
                    return
                if not counted[0]:
                    req.phases.enter("vlm.decode")
                ids = [int(t) for t in value.reshape(-1).tolist()]
                counted[0] += len(ids)
                req.deliver(Tokens(tuple(ids)))

            def end(self) -> None:
                pass

        req.phases.enter("vlm.prefill")
        try:
            inputs = {k: v.to(self.model.device) for k, v in req.inputs.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            with torch.inference_mode():
                self.model.generate(
                    **inputs,
                    generation_config=self._generation_config(req),
                    logits_processor=LogitsProcessorList(processors),
                    stopping_criteria=StoppingCriteriaList([StopCriterion(check)]),
                    streamer=_Streamer(),
                )
        except BaseException as exc:  # noqa: BLE001 - handed to the request's consumer
            req.deliver(Failed(exc))
            return
        req.phases.end()
        req.deliver(Finished(stopped[0] if stopped else "stop", counted[0]))


def _assemble(assembler: DescriptionAssembler, item: Delivery) -> tuple[list[StreamEvent], bool]:
    """One delivery from the model thread -> (the stream events it completes, whether the request ended);
    a Failed delivery raises its error."""
    if isinstance(item, Tokens):
        return list(assembler.tokens(list(item.ids))), False
    if isinstance(item, Finished):
        return list(assembler.finish(item.reason, item.steps)), True
    raise item.error
