"""Session fixtures for the audio model side: the tiny AudioLDM2 checkpoint, built once, and things loaded from it.

Imported into tests/conftest.py (`from tests.audio_fixtures import *`). Heavy imports happen inside the
fixtures, so collecting tests stays fast.
"""
from __future__ import annotations

from pathlib import Path

import pytest

__all__ = ["tiny_audio_dir", "tiny_audio_backend", "tiny_clap_tokenizer"]


@pytest.fixture(scope="session")
def tiny_audio_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny AudioLDM2Pipeline checkpoint (all eleven real components) written with save_pretrained."""
    from tiny_models.audio import build_tiny_audio

    return build_tiny_audio(tmp_path_factory.mktemp("tiny_audio"))


@pytest.fixture(scope="session")
def tiny_audio_backend(tiny_audio_dir: Path):
    """The production loader (DiffusersAudioBackend) on the tiny checkpoint, CPU, loaded once."""
    from audio_service.diffusers_backend import DiffusersAudioBackend

    backend = DiffusersAudioBackend(str(tiny_audio_dir), device="cpu")
    backend.load()
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def tiny_clap_tokenizer(tiny_audio_dir: Path):
    """The tiny checkpoint's CLAP text tokenizer (RobertaTokenizerFast, trained locally)."""
    from transformers import RobertaTokenizerFast

    return RobertaTokenizerFast.from_pretrained(tiny_audio_dir, subfolder="tokenizer")
