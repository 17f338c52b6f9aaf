"""What the model services load, named once: default checkpoints, the Hub token, dtype names."""
from __future__ import annotations

import os
from typing import Any

DEFAULT_VLM_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
DEFAULT_AUDIO_MODEL = "cvssp/audioldm2"

# Accepted spellings -> the canonical torch name. "auto" (VLM only) keeps the checkpoint's own dtype.
DTYPE_ALIASES = {
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "float32": "float32", "fp32": "float32", "float": "float32",
}
DTYPE_NAMES = ("bfloat16", "float16", "float32")  # what --dtype offers


def hf_token(explicit: str | None = None) -> str | None:
    """The Hugging Face token: `explicit`, else HUGGING_FACE_TOKEN (the seed's name), else HF_TOKEN."""
    return explicit or os.environ.get("HUGGING_FACE_TOKEN") or os.environ.get("HF_TOKEN") or None


def torch_dtype(name: Any, device: str, *, gpu_default: str) -> Any:
    """A torch dtype from a name (any alias above), a torch dtype (returned as is), or None: `gpu_default`
    on CUDA, float32 on CPU (half precision is slow or unsupported there)."""
    import torch

    if name is None:
        return getattr(torch, gpu_default) if device.startswith("cuda") else torch.float32
    if not isinstance(name, str):
        return name
    if name == "auto":
        return "auto"
    try:
        return getattr(torch, DTYPE_ALIASES[name.lower()])
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPE_NAMES)}") from None


def checkpoint_revision(model: str, revision: str | None = None, token: str | None = None) -> str | None:
    """Which weights `model` loaded, for result-cache keys (a result is never served across revisions): a
    local folder's fingerprint (every file's path, size and modification time), or the hub snapshot's commit
    as the local hub cache holds it after loading. None when it cannot be told (then nothing is cached)."""
    import hashlib
    from pathlib import Path

    folder = Path(model).expanduser()
    if folder.is_dir():
        digest = hashlib.sha256()
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            stat = path.stat()
            digest.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return "local-" + digest.hexdigest()[:16]
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, revision=revision, token=token, local_files_only=True)).name
    except Exception:  # noqa: BLE001 - not in the local hub cache (or not a hub id): no key, no caching
        return None
