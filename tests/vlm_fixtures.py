"""Session fixtures for the VLM side: the tiny Qwen2.5-VL checkpoint, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen2.5-VL checkpoint (real classes, ~10 MB), written once into a temp dir."""
    from tiny_models.vlm import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm") / "vlm")


def description_schema() -> dict:
    """The v1 answer schema as it applies after the post-rules, which may drop sources (speech, duplicates,
    word-less names) but never produce a malformed one: at least one source instead of three."""
    import copy

    from vlm_prompt import load_prompt

    schema = copy.deepcopy(load_prompt("v1").schema)
    schema["properties"]["sources"]["minItems"] = 1
    return schema
