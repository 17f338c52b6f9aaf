"""Before starting services for `make run`: can the real weights be had? If not, say why and what to do,
in one message, instead of a stack trace from inside a child process minutes later."""
from __future__ import annotations

import os
from pathlib import Path

from serving.models import hf_token
from serving.startup import AUDIO, VLM, check_model_folder

CONFIG_FILES = ("config.json", "model_index.json")


class ModelUnavailable(RuntimeError):
    """A model can be neither found locally nor fetched from the Hugging Face Hub."""


def _advice(model: str) -> str:
    return (
        f"What to do: (1) on a machine with internet access, set HF_TOKEN (or HUGGING_FACE_TOKEN) if the model is "
        f"gated and run again, which downloads it into the Hugging Face cache (HF_HOME); (2) or download it elsewhere "
        f"(`hf download {model}`), copy it here, and pass the folder with --vlm_model / --audio_model; "
        f"(3) or run `make demo` to try the whole pipeline offline on tiny local models."
    )


def check_model(model: str, kind: str | None = None, flag: str = "--model") -> None:
    """Raises ModelUnavailable unless `model` is a checkpoint folder, is in the local cache, or can be fetched;
    with `kind` (serving.startup.VLM or AUDIO), a folder of the other kind or no folder at all (a typo)
    raises StartupError, in one line."""
    path = Path(model)
    if kind is not None:
        if check_model_folder(model, kind, flag):
            return
    elif path.exists():
        if not any((path / name).is_file() for name in CONFIG_FILES):
            raise ModelUnavailable(f"{model} is a folder but holds no config.json or model_index.json")
        return
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    for name in CONFIG_FILES:
        if isinstance(try_to_load_from_cache(model, name), str):
            return  # in the local cache: the service loads it from there
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise ModelUnavailable(f"{model} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set.\n{_advice(model)}")
    _check_reachable(model)
    errors = []
    for name in CONFIG_FILES:
        try:
            hf_hub_download(model, name, token=hf_token())
            return
        except Exception as exc:  # noqa: BLE001 - each kind of failure gets the same advice
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    raise ModelUnavailable(
        f"cannot fetch {model} from the Hugging Face Hub ({errors[-1]}).\n{_advice(model)}"
    )


def _check_reachable(model: str, timeout: float = 5.0) -> None:
    """One TCP connect to the hub (or HF_ENDPOINT): fails in seconds where the hub client would retry
    for a minute before saying the same."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise ModelUnavailable(
            f"{model} is not in the local Hugging Face cache and {host}:{port} cannot be reached ({exc}).\n{_advice(model)}"
        ) from None


def check_models(vlm_model: str | None, audio_model: str | None) -> None:
    """The command line's two models (None: not needed by this run)."""
    if vlm_model:
        check_model(vlm_model, VLM, "--vlm_model")
    if audio_model:
        check_model(audio_model, AUDIO, "--audio_model")
