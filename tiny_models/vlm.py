"""A tiny, deterministic Qwen2.5-VL checkpoint with random weights, for tests and demos.

It keeps the real architecture and layout so that the production loading code path is exercised:
``Qwen2_5_VLForConditionalGeneration`` (tiny text and vision towers; patch 14, spatial merge 2,
real image/video/vision token ids), a byte-level BPE tokenizer trained here on a small built-in corpus
with the Qwen2 pre-tokenizer, whose vocabulary places Qwen's 22 added tokens at their real ids
(151643-151664; the ids in between are unused, as the ids between 151665 and the real model's
``vocab_size`` are), Qwen's ChatML chat template, ``preprocessor_config.json`` naming
``Qwen2VLImageProcessor`` like the hub checkpoint (transformers picks the PIL backend when
torchvision is absent) and a ``generation_config.json`` with the real checkpoint's sampling defaults
(which the backend must override).

Weights are stored in bfloat16, like the hub checkpoints, and the text model is untied like the 7B.
Size on disk: about 10 MB, almost all of it the 151936 x 16 embedding and LM head.

    python -m tiny_models.vlm OUT_DIR
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

# The real Qwen2.5-VL added tokens (tokenizer_config.json of Qwen/Qwen2.5-VL-*-Instruct): id, text, special.
QWEN_ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = (
    (151643, "<|endoftext|>", True),
    (151644, "<|im_start|>", True),
    (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True),
    (151647, "<|object_ref_end|>", True),
    (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True),
    (151653, "<|vision_end|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True),
    (151656, "<|video_pad|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
)

# Qwen2.5-VL's chat template (ChatML with vision placeholders), as published with the checkpoints.
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The real checkpoint's generation_config.json (Qwen/Qwen2.5-VL-7B-Instruct).
QWEN_VL_GENERATION_CONFIG = {
    "bos_token_id": 151643,
    "pad_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "repetition_penalty": 1.05,
    "temperature": 0.1,
    "top_p": 0.001,
    "top_k": 1,
}

TINY_VOCAB_SIZE = 151936  # Qwen2.5-VL-3B's lm_head size (7B: 152064); covers the added tokens.
TINY_MIN_PIXELS = 4 * 28 * 28
TINY_MAX_PIXELS = 64 * 28 * 28
SEED = 1234

_OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Same as transformers' Qwen2Tokenizer (and the hub tokenizer.json).
_QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

_SOURCES = [
    ("rain", "tin roof"), ("dog", "paws on gravel"), ("door", "wood"), ("car", "asphalt road"),
    ("wind", "pine trees"), ("waves", "rocky shore"), ("birds", "feathers"), ("kettle", "steel"),
    ("footsteps", "wooden floor"), ("bicycle", "metal chain"), ("fire", "dry logs"), ("clock", "brass"),
    ("train", "steel rails"), ("leaves", "dry leaves"), ("river", "stones"), ("bell", "bronze"),
    ("crowd", "hands"), ("cup", "ceramic"), ("keys", "metal"), ("engine", "iron"), ("glass", "window"),
    ("thunder", "sky"), ("fountain", "stone basin"), ("cat", "fur"), ("horse", "hooves on cobblestone"),
]
_ACTIONS = [
    "drumming on the roof", "barking", "slamming shut", "creaking open", "passing by", "rustling",
    "crashing on the shore", "chirping", "whistling", "tapping", "rattling", "crackling", "ticking",
    "rumbling", "splashing", "ringing", "clapping", "clinking", "jingling", "humming", "knocking",
    "dripping", "buzzing", "thudding", "scraping", "flowing", "purring", "galloping", "roaring",
]
_TIMBRES = [
    "metallic", "sharp", "soft", "deep", "bright", "hollow", "dull", "crisp", "warm", "rough",
    "airy", "low", "high", "resonant", "muffled", "rhythmic", "steady", "gentle", "loud", "harsh",
]
_ROLES = ["guitar", "bass", "keyboard", "drums", "none"]
_SCENES = [
    "A rainy street at night with parked cars and a small cafe.",
    "A quiet kitchen with a kettle on the stove and a cat on the table.",
    "A forest path in autumn with a river and birds in the trees.",
    "A busy train station with people walking and a clock on the wall.",
    "A beach at sunset with waves, gulls and a wooden pier.",
]
_MOODS = ["calm", "busy", "peaceful", "tense", "cozy", "lively", "melancholic", "warm and quiet"]
_PROSE = [
    "You are a sound designer. Look at the image and list what in it could make a sound.",
    "Describe each sound source: what it is, its material, how it sounds, its timbre and role.",
    "Answer with JSON only. No human speech or vocal sounds; footsteps and clapping are fine.",
    "Instrument role: guitar, bass, keyboard, drums or none. Confidence from 0 to 1.",
    "Realistic, non-musical sound effects that could plausibly occur in the scene.",
]


def _corpus() -> list[str]:
    """A small deterministic corpus: prose, audio words and JSON in both the compact and the seed format."""
    lines: list[str] = list(_PROSE) + list(_SCENES)
    for i, ((name, material), scene) in enumerate(zip(_SOURCES, itertools.cycle(_SCENES))):
        variants = []
        seed_variants = []
        for j in range(3):
            action = _ACTIONS[(i * 3 + j) % len(_ACTIONS)]
            timbre = [_TIMBRES[(i + j + k * 7) % len(_TIMBRES)] for k in range(2)]
            role = _ROLES[(i + j) % len(_ROLES)]
            conf = round(0.55 + ((i * 7 + j * 3) % 45) / 100, 2)
            variants.append({"action": action, "timbre": timbre, "role": role, "confidence": conf})
            seed_variants.append({
                "play_method": action, "timbre": timbre,
                "mapping_to_music_instrument": role if role != "none" else "None", "confidence": conf,
            })
        mood = _MOODS[i % len(_MOODS)]
        compact = {"scene": scene, "mood": mood,
                   "sources": [{"name": name, "material": material, "variants": variants}]}
        seed = {"scene_description": scene, "mood_description": mood,
                "sound_sources": [{"name": name, "material": material, "variants": seed_variants}]}
        lines.append(json.dumps(compact, separators=(",", ":")))
        lines.append(json.dumps(compact))
        lines.append(json.dumps(seed, indent=2))
        lines.append(f"The {name} made of {material} is {variants[0]['action']}, {', '.join(variants[0]['timbre'])}.")
    lines.extend(f"{a} {b}" for a, b in zip(_TIMBRES, _ACTIONS))
    lines.extend(str(n / 100) for n in range(0, 101))
    return lines


def _train_tokenizer_model(vocab_size: int = 3000) -> tuple[dict[str, int], list[tuple[str, str]]]:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(_corpus() * 2, trainer)
    state = json.loads(tok.to_str())
    vocab: dict[str, int] = state["model"]["vocab"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in state["model"]["merges"]]
    return vocab, merges


def _build_tokenizer(out_dir: Path):
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = _train_tokenizer_model()
    if max(vocab.values()) >= QWEN_ADDED_TOKENS[0][0]:
        raise RuntimeError("trained vocabulary overlaps the reserved added-token ids")
    for idx, content, _special in QWEN_ADDED_TOKENS:
        vocab[content] = idx
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        errors="replace",
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        extra_special_tokens=[c for _, c, special in QWEN_ADDED_TOKENS[1:14] if special],
    )
    tokenizer.add_tokens([AddedToken(c, special=s, normalized=False) for _, c, s in QWEN_ADDED_TOKENS])
    tokenizer.chat_template = QWEN_VL_CHAT_TEMPLATE
    for idx, content, _special in QWEN_ADDED_TOKENS:
        got = tokenizer.convert_tokens_to_ids(content)
        if got != idx:
            raise RuntimeError(f"{content} landed on id {got}, expected {idx}")
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def _tiny_config():
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        architectures=["Qwen2_5_VLForConditionalGeneration"],
        text_config={
            "vocab_size": TINY_VOCAB_SIZE,
            "hidden_size": 16,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "hidden_act": "silu",
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "rope_scaling": {"type": "default", "rope_type": "default", "mrope_section": [1, 1, 2]},
            "rope_theta": 1000000.0,
            "use_sliding_window": False,
            "sliding_window": 32768,
            "max_window_layers": 2,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "initializer_range": 0.02,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "in_channels": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [1],
            "tokens_per_second": 2,
            "out_hidden_size": 16,
            "hidden_act": "silu",
        },
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        tie_word_embeddings=False,
    )


def build_tiny_vlm(out_dir: Path) -> Path:
    """Write the tiny checkpoint to ``out_dir`` (created if needed) and return it.

    Deterministic: the same files every time (fixed seeds, fixed corpus).
    """
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer(out_dir)

    config = _tiny_config()
    torch.manual_seed(SEED)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(**QWEN_VL_GENERATION_CONFIG)
    model.to(torch.bfloat16).save_pretrained(out_dir)
    # Keep the hub's GenerationConfig verbatim (save_pretrained may validate/alter sampling flags).
    (out_dir / "generation_config.json").write_text(json.dumps(QWEN_VL_GENERATION_CONFIG, indent=2) + "\n")

    # The hub checkpoint's preprocessor_config.json names the torchvision class; transformers falls back to
    # Qwen2VLImageProcessorPil when torchvision is missing, which is the path we want to exercise.
    preprocessor = {
        "min_pixels": TINY_MIN_PIXELS,
        "max_pixels": TINY_MAX_PIXELS,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": _OPENAI_CLIP_MEAN,
        "image_std": _OPENAI_CLIP_STD,
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
    }
    (out_dir / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    (out_dir / "chat_template.json").write_text(
        json.dumps({"chat_template": QWEN_VL_CHAT_TEMPLATE}, indent=2) + "\n"
    )
    if tokenizer.convert_tokens_to_ids("<|image_pad|>") != config.image_token_id:
        raise RuntimeError("image token id mismatch")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in {"-h", "--help"}:
        print("usage: python -m tiny_models.vlm OUT_DIR", file=sys.stderr)
        return 2
    out = build_tiny_vlm(Path(argv[0]))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote tiny Qwen2.5-VL checkpoint to {out} ({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
