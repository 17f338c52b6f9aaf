"""Checkpoints for the benchmark: the tiny ones, or the full-size architectures with random weights.

Full size: the VLM as a skeleton (the real config from bench/model_configs/, tokenizer and processor, no
weights): the VLM service builds random weights on its own device (`--random-weights`: meta-device
construction, then initialisation on the device), so no 16 GB are written and read back. The audio
pipeline (2.2 GB) is still built with random weights on the device and written with `save_pretrained`,
loaded through the real `from_pretrained` path (same compute and memory as the real checkpoints). The tokenizers are the tiny
builders' locally trained ones: they put Qwen's special tokens at the real ids, and every id they make
is inside the real vocabularies. Written once into a cache folder and reused (a `.complete` marker);
the time it takes is reported apart from the services' start-up.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent / "model_configs"
VLM_CONFIGS = {"7b": "qwen2.5-vl-7b.config.json", "3b": "qwen2.5-vl-3b.config.json"}
AUDIO_VARIANTS = ("base", "large")
MARKER = ".complete"


def in_subprocess(kind: str, cache: Path, name: str, device: str) -> tuple[Path, float]:
    """Builds a full-size checkpoint in a child process, so the bench process never holds GPU memory
    (its own CUDA context or a 16 GB model's leftovers) while it measures the services."""
    path = cache / (f"random-qwen2.5-vl-{name}-skeleton" if kind == "vlm" else f"random-audioldm2-{name}")
    if _done(path):
        return path, 0.0  # built by an earlier run
    subprocess.run([sys.executable, "-m", "bench.checkpoints", kind, str(cache), name, device], check=True)
    return path, float((path / MARKER).read_text())


def _done(path: Path) -> bool:
    return (path / MARKER).exists()


def _finish(path: Path, started: float) -> float:
    seconds = time.perf_counter() - started
    (path / MARKER).write_text(f"{seconds:.1f}\n")
    return seconds


def tiny_vlm(cache: Path) -> tuple[Path, float]:
    from tiny_models.vlm import build_tiny_vlm

    path = cache / "tiny-vlm"
    if _done(path):
        return path, 0.0
    started = time.perf_counter()
    build_tiny_vlm(path)
    return path, _finish(path, started)


def tiny_audio(cache: Path) -> tuple[Path, float]:
    from tiny_models.audio import build_tiny_audio

    path = cache / "tiny-audio"
    if _done(path):
        return path, 0.0
    started = time.perf_counter()
    build_tiny_audio(path)
    return path, _finish(path, started)


def vlm_skeleton(cache: Path, size: str) -> tuple[Path, float]:
    """Qwen2.5-VL-{7B,3B}'s config, tokenizer and processor files without weights (seconds, a few MB): the
    VLM service builds the weights itself on its device (``--random-weights``): nothing written or read."""
    from transformers import Qwen2_5_VLConfig

    from tiny_models.vlm import QWEN_VL_GENERATION_CONFIG, build_tiny_vlm

    path = cache / f"random-qwen2.5-vl-{size}-skeleton"
    if _done(path):
        return path, 0.0
    started = time.perf_counter()
    if path.exists():
        shutil.rmtree(path)
    build_tiny_vlm(path)  # tokenizer, chat template, processor files; its weights and config are replaced
    for f in list(path.glob("*.safetensors")) + list(path.glob("*.safetensors.index.json")):
        f.unlink()
    Qwen2_5_VLConfig(**json.loads((CONFIGS / VLM_CONFIGS[size]).read_text())).save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps(QWEN_VL_GENERATION_CONFIG, indent=2) + "\n")
    # The real image-size bounds (one visual token per 28x28 pixels), not the tiny ones.
    pre = json.loads((path / "preprocessor_config.json").read_text())
    pre.update(json.loads((CONFIGS / "qwen2.5-vl.preprocessor.json").read_text()))
    (path / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    return path, _finish(path, started)


def full_audio(cache: Path, variant: str, device: str) -> tuple[Path, float]:
    """cvssp/audioldm2 (or -large) with random fp16 weights, all eleven components, the real layout."""
    import torch
    from diffusers import AudioLDM2Pipeline, AutoencoderKL, DDIMScheduler
    from diffusers.pipelines.audioldm2 import AudioLDM2ProjectionModel, AudioLDM2UNet2DConditionModel
    from transformers import (
        ClapConfig,
        ClapModel,
        GPT2Config,
        GPT2Model,
        SpeechT5HifiGan,
        SpeechT5HifiGanConfig,
        T5Config,
        T5EncoderModel,
    )

    from tiny_models.audio import REAL_MODEL_INDEX_CLASSES, build_tiny_pipeline

    path = cache / f"random-audioldm2-{variant}"
    if _done(path):
        return path, 0.0
    started = time.perf_counter()
    if path.exists():
        shutil.rmtree(path)
    c = json.loads((CONFIGS / "audioldm2-base.components.json").read_text())
    unet_config = dict(c["unet"])
    if variant == "large":
        unet_config.update(json.loads((CONFIGS / "audioldm2-large.unet-overrides.json").read_text()))
    strip = lambda d: {k: v for k, v in d.items() if k not in ("_class_name", "architectures")}  # noqa: E731
    tiny = build_tiny_pipeline()  # tokenizers and feature extractor (locally trained; ids fit the real vocabularies)
    tiny.tokenizer.model_max_length = c["tokenizer_max_length"]
    tiny.tokenizer_2.model_max_length = c["tokenizer_2_max_length"]
    torch.manual_seed(0)
    with torch.device(device):
        pipe = AudioLDM2Pipeline(
            vae=AutoencoderKL.from_config(strip(c["vae"])),
            text_encoder=ClapModel(ClapConfig(**strip(c["text_encoder"]))),
            text_encoder_2=T5EncoderModel(T5Config(**strip(c["text_encoder_2"]))),
            projection_model=AudioLDM2ProjectionModel(**strip(c["projection_model"])),
            language_model=GPT2Model(GPT2Config(**strip(c["language_model"]))),
            tokenizer=tiny.tokenizer,
            tokenizer_2=tiny.tokenizer_2,
            feature_extractor=tiny.feature_extractor,
            unet=AudioLDM2UNet2DConditionModel.from_config(strip(unet_config)),
            scheduler=DDIMScheduler.from_config(strip(c["scheduler"])),
            vocoder=SpeechT5HifiGan(SpeechT5HifiGanConfig(**strip(c["vocoder"]))),
        )
    pipe.to(torch.float16).save_pretrained(path, safe_serialization=True)
    del pipe
    index_path = path / "model_index.json"
    index = json.loads(index_path.read_text())
    index.update(REAL_MODEL_INDEX_CLASSES)
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return path, _finish(path, started)


if __name__ == "__main__":  # python -m bench.checkpoints vlm|audio CACHE SIZE_OR_VARIANT DEVICE
    _kind, _cache, _name, _device = sys.argv[1:5]
    build = vlm_skeleton if _kind == "vlm" else full_audio
    print(build(Path(_cache), _name) if _kind == "vlm" else build(Path(_cache), _name, _device))
